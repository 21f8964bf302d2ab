"""`gradgraph heads` and `gradgraph sva`: clear errors for bad inputs, no partial results."""

import csv
import json

import pytest

from gradgraph import GradGraphError
from gradgraph.cli import main
from gradgraph.studies.head_ranking import read_prompts


def test_empty_line_in_prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("The keys to the cabinet\n\nThe key to the cabinets\n")
    with pytest.raises(GradGraphError, match=r"empty line\(s\) \[2\]"):
        read_prompts(path)
    path.write_text("The keys to the cabinet\nThe key\n\n")  # trailing newlines are fine
    assert read_prompts(path) == ["The keys to the cabinet", "The key"]


def test_heads_errors_exit_cleanly(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The keys to the cabinet\n\nThe key\n")
    out = tmp_path / "out"
    assert main(["heads", "--prompts", str(prompts), "--good", " are", "--bad", " is", "--out", str(out)]) == 2
    assert "empty line" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.real
def test_heads_two_token_verb_and_bad_position(tmp_path, capsys, smol_model):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The keys to the cabinet\n")
    out = tmp_path / "out"
    args = ["heads", "--prompts", str(prompts), "--out", str(out), "--figures", str(tmp_path / "f")]
    assert main(args + ["--good", " antidisestablishmentarianism", "--bad", " is"]) == 2
    assert "not one" in capsys.readouterr().err
    assert main(args + ["--good", " are", "--bad", " is", "--position", "9"]) == 2
    assert "outside prompt 0, which has 6 tokens" in capsys.readouterr().err
    assert not (out / "heads.csv").exists()


def test_sva_limit_zero_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["sva", "--limit", "0"])
    assert "positive integer" in capsys.readouterr().err


@pytest.mark.real
def test_heads_ranks_every_head_by_every_method(tmp_path, capsys, smol_model):
    prompts, counterfactuals = tmp_path / "p.txt", tmp_path / "c.txt"
    prompts.write_text("The keys to the cabinet\nThe key to the cabinets\n")
    counterfactuals.write_text("The key to the cabinet\nThe keys to the cabinets\n")
    out = tmp_path / "out"
    assert main(["heads", "--prompts", str(prompts), "--counterfactuals", str(counterfactuals), "--good", " are",
                 "--bad", " is", "--out", str(out), "--figures", str(tmp_path / "f")]) == 0
    with open(out / "heads.csv") as handle:
        rows = list(csv.DictReader(handle))
    n_layers, n_heads = smol_model.cfg.n_layers, smol_model.cfg.n_heads
    assert len(rows) == n_layers * (n_heads + 1)
    methods = ("flow_share", "top_path", "attribution", "ablation", "patching")
    values = {m: [float(r[m]) for r in rows] for m in methods}
    assert all(0 <= v <= 1 for m in ("flow_share", "top_path") for v in values[m])
    assert max(values["top_path"]) <= 1 and max(values["flow_share"]) > 0
    # attribution patching is the first-order estimate of patching: they agree in sign on the big effects
    big = sorted(range(len(rows)), key=lambda i: -abs(values["patching"][i]))[:10]
    assert sum((values["attribution"][i] > 0) == (values["patching"][i] > 0) for i in big) >= 7
    assert len(list((tmp_path / "f").glob("heads_*.png"))) == len(methods)
    assert "top heads by patching" in capsys.readouterr().out


@pytest.mark.real
def test_sva_study_end_to_end(tmp_path, smol_model):
    """The main job on a handful of items: every table, figure and the report appear, rows are the
    items they claim to be, and a file the study did not write survives in its output folder."""
    out, figures = tmp_path / "sva", tmp_path / "figures"
    out.mkdir()
    (out / "my_notes.txt").write_text("mine")
    args = ["sva", "--limit", "8", "--intervention-items", "2", "--out", str(out), "--figures", str(figures)]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["items_analysed"] == 8 and summary["items_intervened"] == 2
    for row in summary["subject_last_layers"]["oplus"]:
        assert abs(row["q"] + row["k"] + row["v"] + row["skip"] - 1) < 1e-9
    for name in ("accuracy.csv", "branch_shares.csv", "components.csv", "correlations.csv", "entropy.csv",
                 "component_graph.graphml", "report.md", "items.csv"):
        assert (out / name).stat().st_size > 0, name
    assert len(list(figures.glob("sva_*.png"))) == 7
    assert "Spearman" in (out / "report.md").read_text()
    assert (out / "my_notes.txt").read_text() == "mine"
    with open(out / "items.csv") as handle:
        items = list(csv.DictReader(handle))
    assert len(items) == 8 and len({r["prefix"] for r in items}) == 8


@pytest.mark.real
def test_head_types_writes_a_table_and_a_figure(tmp_path, capsys, smol_model):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The old man reads a long book quietly.\nShe quickly wrote the final letter.\n"
                      "My brother bought a red car.\nThe children eat sweet apples.\n")
    out = tmp_path / "types"
    assert main(["head-types", "--corpus", str(corpus), "--out", str(out)]) == 0
    with open(out / "head_types.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == smol_model.cfg.n_layers * smol_model.cfg.n_heads
    assert {"offset", "offset_share", "positional", "nsubj_accuracy", "amod_accuracy"} <= set(rows[0])
    assert (out / "figures" / "head_types.png").is_file() and (out / "thresholds.csv").is_file()
    assert "positional heads" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["head-types", "--threshold", "1.5"])


@pytest.mark.real
def test_lrp_eval_end_to_end(tmp_path, capsys):
    out = tmp_path / "lrp"
    assert main(["lrp-eval", "--sentences", "2", "--sva-items", "2", "--relp-items", "2", "--head-sentences", "12",
                 "--out", str(out)]) == 0
    with open(out / "evaluation.csv") as handle:
        rows = list(csv.DictReader(handle))
    methods = {r["method"] for r in rows}
    assert {"gradient × input", "raw attention", "attention rollout", "LRP (attn-lrp)", "LRP (chefer2021)",
            "partial LRP", "Chefer rollout", "Mask-LRP (synt+pos)", "Mask-LRP (random)"} <= methods
    assert {r["dataset"] for r in rows} == {"Rotten Tomatoes", "SVA"} and all(r["n"] == "2" for r in rows)
    for r in rows:
        assert -1 <= float(r["aopc"]) <= 1 and float(r["log_odds"]) == float(r["log_odds"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["results"]["SVA"]["conservation"]["cp-lrp"]["median_abs_relative"] < 1e-4
    with open(out / "relp.csv") as handle:
        relp = list(csv.DictReader(handle))
    assert {r["site"] for r in relp} == {"resid_pre", "attn_out", "mlp_out"} and len(relp) == 6
    for name in ("lrp_eval_aopc.png", "lrp_eval_log-odds.png", "lrp_eval_tokens_rotten.png", "lrp_eval_tokens_sva.png",
                 "head_types.png"):
        assert (out / "figures" / name).is_file(), name
    assert "Pearson r" in capsys.readouterr().out
