"""`gradgraph heads` and `gradgraph sva`: clear errors for bad inputs, no partial results."""

import csv
import json
import math

import pytest

from gradgraph import GradGraphError
from gradgraph.cli import main
from gradgraph.prompts import read_prompts


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
def test_heads_two_token_verb_and_bad_position(tmp_path, capsys, smol_model):  # noqa: D103
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
def test_heads_ranks_every_component_by_every_method(tmp_path, capsys, smol_model):
    prompts, counterfactuals = tmp_path / "p.txt", tmp_path / "c.txt"
    prompts.write_text("The keys to the cabinet\nThe key to the cabinets\nThe dogs near the house\n")
    counterfactuals.write_text("The key to the cabinet\nThe keys to the cabinets\nThe dog near the house\n")
    out = tmp_path / "out"
    assert main(["heads", "--prompts", str(prompts), "--counterfactuals", str(counterfactuals), "--good", " are",
                 "--bad", " is", "--methods", "flow,top_path,attribution,attn_lrp", "--resamples", "50",
                 "--out", str(out)]) == 0
    with open(out / "heads.csv") as handle:
        rows = list(csv.DictReader(handle))
    n_layers, n_heads, groups = smol_model.cfg.n_layers, smol_model.cfg.n_heads, smol_model.cfg.n_key_value_heads
    assert len(rows) == n_layers * (2 * n_heads + 2 * groups + 1)  # q inputs, k, v, head outputs, the MLP
    values = {m: [float(r[m]) for r in rows] for m in ("flow", "top_path", "attribution", "attn_lrp", "patching")}
    assert all(0 <= v <= 1 for m in ("flow", "top_path") for v in values[m]) and max(values["flow"]) > 0
    # attribution patching is the first-order estimate of patching: they agree in sign on the big effects
    big = sorted(range(len(rows)), key=lambda i: -abs(values["patching"][i]))[:10]
    assert sum((values["attribution"][i] > 0) == (values["patching"][i] > 0) for i in big) >= 7
    with open(out / "agreement.csv") as handle:
        agreement = list(csv.DictReader(handle))
    assert {r["truth"] for r in agreement} == {"mean ablation", "activation patching"}
    # three prompts: no interval anyone should read, and the rows say so (a percentile interval here
    # need not contain its estimate, and did not: the old assertion low <= estimate could fail)
    assert all(math.isnan(float(r["spearman_low"])) and math.isnan(float(r["spearman_high"])) for r in agreement)
    assert {r["interval"] for r in agreement} == {"no intervals: 3 items, they need 10"}
    assert (out / "report.html").stat().st_size > 1_000_000  # plotly.js inlined
    assert len(list((out / "figures").glob("heads_*.png"))) == 4 + 2 + 1
    printed = capsys.readouterr().out
    assert "top components by patching" in printed and "(no intervals: 3 prompts, they need 10)" in printed


@pytest.mark.real
def test_sva_study_end_to_end(sva_run):
    """The main job on a handful of items: every table, figure and both reports appear under --out,
    rows are the items they claim to be, and a file the study did not write survives there."""
    out = sva_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["items_analysed"] == 6 and summary["items_intervened"] == 2
    for name, rows in summary["subject_last_layers"].items():
        for row in rows:
            total = row["q"] + row["k"] + row["v"] + row["skip"]
            assert abs(total - 1) < 1e-9 or total == 0, name
    for name in ("accuracy.csv", "agreement.csv", "components.csv", "subject_wins.csv", "entropy.csv",
                 "branch_shares.csv", "component_graph.graphml", "report.md", "report.html", "items.csv",
                 "circuit-tracer/gradgraph-sva.json", "circuit-tracer/graph-metadata.json"):
        assert (out / name).stat().st_size > 0, name
    assert len(list((out / "figures").glob("sva_*.png"))) == 8
    with open(out / "agreement.csv") as handle:
        methods = {r["method"] for r in csv.DictReader(handle)}
    assert methods == {"gradient flow", "best path (Max)", "attribution patching", "AttnLRP relevance",
                       "UDIG conductance"}
    assert "Spearman" in (out / "report.md").read_text()
    assert (out / "my_notes.txt").read_text() == "mine"
    with open(out / "items.csv") as handle:
        items = list(csv.DictReader(handle))
    assert len(items) == 6 and all(0 < float(r["normalised_entropy"]) <= 1 for r in items)
    tracer = json.loads((out / "circuit-tracer/gradgraph-sva.json").read_text())
    assert set(tracer) == {"metadata", "qParams", "nodes", "links"}
    ids = {n["node_id"] for n in tracer["nodes"]}
    assert len(ids) == len(tracer["nodes"]) and all(l["source"] in ids and l["target"] in ids for l in tracer["links"])
    assert {n["feature_type"] for n in tracer["nodes"]} == {"embedding", "cross layer transcoder", "logit"}


def test_sva_bad_inputs_leave_nothing_behind(tmp_path, capsys):
    out = tmp_path / "a-file"
    out.write_text("not a folder")
    assert main(["sva", "--limit", "2", "--out", str(out)]) == 2
    assert "must be a folder" in capsys.readouterr().err and out.read_text() == "not a folder"
    with pytest.raises(SystemExit):
        main(["sva", "--methods", "flow,shap"])
    assert "unknown method" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [out]  # no staging folder left behind


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
