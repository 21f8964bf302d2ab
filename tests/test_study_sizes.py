"""Every study at the small and odd sizes a user may choose (1, 2, 3 and 5 items, one item per
condition, a method list of one), run through the command on ``tiny-smollm2`` (SmolLM2's
tokenizer and architecture, two small layers of random weights): each ends with its tables,
figures, report and saved results, and with intervals only where there are enough items."""

import csv
import json
import math

import pytest

from gradgraph.bootstrap import MIN_ITEMS
from gradgraph.cli import main
from gradgraph.studies.saved import FOLDER

TINY = ["--model", "tiny-smollm2"]
SVA_FAST = TINY + ["--head-sentences", "4", "--udig-steps", "2", "--resamples", "50", "--batch-size", "2"]


def _rows(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


def _saved(out):
    assert (out / FOLDER / "result.json").stat().st_size > 0 and (out / FOLDER / "tensors.safetensors").is_file()


@pytest.mark.parametrize("limit, intervened, methods", [
    (1, 1, None), (2, 2, None), (3, 2, None), (5, 5, None),
    (20, MIN_ITEMS, "flow,attribution"),  # one item of each of the 20 (condition, attractors, number) cells
    (3, 3, "flow"), (2, 1, "udig"), (3, 1, "mask_lrp"), (2, 2, "attribution"), (2, 2, "top_path"),
])
def test_sva_at_every_size(tmp_path, capsys, limit, intervened, methods):
    out = tmp_path / "sva"
    args = ["sva", *SVA_FAST, "--limit", str(limit), "--intervention-items", str(intervened), "--out", str(out)]
    assert main(args + (["--methods", methods] if methods else [])) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["items_analysed"] == limit and summary["items_intervened"] == intervened
    _saved(out)
    for name in ("accuracy.csv", "agreement.csv", "components.csv", "entropy.csv", "items.csv", "report.md",
                 "report.html"):
        assert (out / name).stat().st_size > 0, name
    agreement = _rows(out / "agreement.csv")
    chosen = methods.split(",") if methods else None
    assert {r["key"] for r in agreement} == set(chosen or {r["key"] for r in agreement})
    for r in agreement:
        assert int(r["n_items"]) == intervened
        low, high = float(r["spearman_low"]), float(r["spearman_high"])
        if intervened < MIN_ITEMS:
            assert math.isnan(low) and math.isnan(high) and r["interval"].startswith("no intervals")
        else:
            assert -1 <= low <= high <= 1 and r["interval"] == "basic bootstrap 95 %"
    report = (out / "report.md").read_text()
    assert ("no intervals" in report) == (intervened < MIN_ITEMS)
    assert len(_rows(out / "items.csv")) == limit
    if limit == 20:  # take() spreads the items over the cells: one each
        cells = {(r["condition"], r["n_attractors"], r["subject_number"]) for r in _rows(out / "items.csv")}
        assert len(cells) == 20
    assert (out / "figures" / "sva_agreement.png").is_file() and (out / "figures" / "sva_accuracy.png").is_file()
    assert "Report:" in capsys.readouterr().out


@pytest.mark.parametrize("prompts, counterfactual, methods", [
    (1, True, None), (2, True, "attribution"), (3, True, None), (5, False, None), (1, False, "flow"),
    (MIN_ITEMS, True, "flow,relp"),
])
def test_heads_at_every_size(tmp_path, capsys, prompts, counterfactual, methods):
    words = ["keys", "key", "dogs", "dog", "boxes", "box", "cats", "cat", "kids", "kid", "cars", "car"]
    clean = [f"The {words[i % 12]} near the house" for i in range(prompts)]
    flipped = [f"The {words[(i % 12) ^ 1]} near the house" for i in range(prompts)]
    (tmp_path / "p.txt").write_text("\n".join(clean) + "\n")
    (tmp_path / "c.txt").write_text("\n".join(flipped) + "\n")
    out = tmp_path / "heads"
    args = ["heads", *TINY, "--prompts", str(tmp_path / "p.txt"), "--good", " are", "--bad", " is",
            "--head-sentences", "4", "--udig-steps", "2", "--resamples", "50", "--out", str(out)]
    args += ["--counterfactuals", str(tmp_path / "c.txt")] if counterfactual else []
    args += ["--methods", methods] if methods else []
    assert main(args) == 0
    _saved(out)
    rows = _rows(out / "heads.csv")
    assert len(rows) == 2 * (2 * 4 + 2 * 2 + 1)  # two layers: q inputs, k, v, head outputs, the MLP
    agreement = _rows(out / "agreement.csv")
    assert agreement and all(int(r["n_items"]) == prompts for r in agreement)
    assert {r["truth"] for r in agreement} == ({"mean ablation", "activation patching"} if counterfactual
                                              else {"mean ablation"})
    shown = [not math.isnan(float(r["spearman_low"])) for r in agreement]
    assert all(shown) if prompts >= MIN_ITEMS else not any(shown)
    printed = capsys.readouterr().out
    assert (f"no intervals: {prompts} prompt" in printed) == (prompts < MIN_ITEMS)
    assert (out / "report.html").stat().st_size > 1_000_000 and (out / "figures" / "heads_agreement.png").is_file()


@pytest.mark.parametrize("sentences", [1, 2, 3, 5])
def test_head_types_at_every_size(tmp_path, sentences):
    out = tmp_path / "types"
    assert main(["head-types", *TINY, "--sentences", str(sentences), "--out", str(out)]) == 0
    rows = _rows(out / "head_types.csv")
    assert len(rows) == 2 * 4 and (out / "figures" / "head_types.png").is_file()
    _saved(out)


def test_head_types_on_a_one_sentence_corpus(tmp_path):
    (tmp_path / "c.txt").write_text("The old man reads a long book.\n")
    out = tmp_path / "types"
    assert main(["head-types", *TINY, "--corpus", str(tmp_path / "c.txt"), "--out", str(out)]) == 0
    assert len(_rows(out / "head_types.csv")) == 8


@pytest.mark.parametrize("sentences, sva, relp", [(1, 1, 1), (2, 3, 0), (3, 2, 2), (5, 5, 1)])
def test_lrp_eval_at_every_size(tmp_path, sentences, sva, relp):
    out = tmp_path / "lrp"
    assert main(["lrp-eval", *TINY, "--sentences", str(sentences), "--sva-items", str(sva), "--relp-items", str(relp),
                 "--head-sentences", "2", "--out", str(out)]) == 0
    rows = _rows(out / "evaluation.csv")
    assert {r["dataset"]: int(r["n"]) for r in rows} == {"Rotten Tomatoes": sentences, "SVA": sva}
    if relp:
        assert len(_rows(out / "relp.csv")) == 6  # three sites, two estimates
    else:
        assert not (out / "relp.csv").exists()
    for name in ("lrp_eval_aopc.png", "lrp_eval_log-odds.png", "lrp_eval_tokens_rotten.png", "lrp_eval_tokens_sva.png"):
        assert (out / "figures" / name).is_file(), name
    _saved(out)


@pytest.mark.parametrize("sentences, sva", [(1, 1), (2, 3)])
def test_attr_eval_at_every_size(tmp_path, sentences, sva):
    out = tmp_path / "attr"
    assert main(["attr-eval", *TINY, "--sentences", str(sentences), "--sva-items", str(sva), "--corpus", "1",
                 "--steps", "2", "--samples", "2", "--out", str(out)]) == 0
    rows = _rows(out / "evaluation.csv")
    assert {(r["dataset"], int(r["n"])) for r in rows} == {("Rotten Tomatoes", sentences), ("SVA", sva)}
    assert len(rows) == 2 * 9 and (out / "figures" / "attr_eval_metrics.png").is_file()
    _saved(out)


@pytest.mark.parametrize("args, message", [
    (["sva", "--limit", "3", "--intervention-items", "5"], "more than the 3 items analysed"),
    (["sva", "--limit", "801"], "choose at most"),
    (["lrp-eval", "--sva-items", "2", "--relp-items", "3"], "--relp-items 3 is more than the 2 SVA items"),
])
def test_sizes_that_cannot_be_met_are_refused_before_any_work(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert main(args + TINY + ["--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_figure_that_fails_loses_nothing_and_redraw_draws_it(tmp_path, capsys, monkeypatch):
    """A failure while drawing: everything computed is saved, every other output written, a file of
    the user's kept, exit status 1 with what failed and the command that redraws; then --redraw,
    with no model, writes the same tables and the missing figure."""
    from gradgraph import plot

    out = tmp_path / "sva"
    out.mkdir()
    (out / "notes.txt").write_text("mine")

    def broken(*args, **kwargs):
        raise ValueError("'xerr' must not contain negative values")

    monkeypatch.setattr(plot, "agreement_plot", broken)
    args = ["sva", *SVA_FAST, "--limit", "3", "--intervention-items", "2", "--methods", "flow,attribution"]
    assert main(args + ["--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "sva_agreement.png: ValueError: 'xerr' must not contain negative values" in err
    assert f"gradgraph sva --redraw {out}" in err and "Traceback" in err
    _saved(out)
    assert not (out / "figures" / "sva_agreement.png").exists() and (out / "figures" / "sva_accuracy.png").is_file()
    tables = {name: (out / name).read_text() for name in ("agreement.csv", "components.csv", "items.csv", "report.md")}
    assert (out / "report.html").is_file() and (out / "notes.txt").read_text() == "mine"
    monkeypatch.undo()
    monkeypatch.setattr("gradgraph.studies.sva.load_model", lambda *a, **k: pytest.fail("redraw loaded a model"))
    assert main(["sva", "--redraw", str(out)]) == 0
    assert (out / "figures" / "sva_agreement.png").is_file() and (out / "notes.txt").read_text() == "mine"
    assert {name: (out / name).read_text() for name in tables} == tables


@pytest.mark.parametrize("command", ["sva", "heads", "head-types", "lrp-eval", "attr-eval"])
def test_redraw_refuses_a_folder_without_saved_results_or_of_another_command(tmp_path, capsys, command):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([command, "--redraw", str(empty)]) == 2
    assert "holds no saved results" in capsys.readouterr().err
    out = tmp_path / "types"
    assert main(["head-types", *TINY, "--sentences", "1", "--out", str(out)]) == 0
    if command != "head-types":
        assert main([command, "--redraw", str(out)]) == 2
        assert f"gradgraph head-types --redraw {out}" in capsys.readouterr().err


@pytest.mark.parametrize("study, config", [
    ("sva", dict(limit=0)), ("sva", dict(intervention_items=0)), ("sva", dict(limit=2, intervention_items=3)),
    ("sva", dict(resamples=0)),
    ("head_types", dict(sentences=0)), ("head_types", dict(threshold=1.5)),
    ("lrp_eval", dict(sentences=0)), ("lrp_eval", dict(sva_items=1, relp_items=2)),
    ("attr_eval", dict(sva_items=0)), ("attr_eval", dict(steps=0)),
])
def test_a_size_of_zero_is_refused_before_the_model_loads(tmp_path, monkeypatch, study, config):
    import importlib

    from gradgraph import GradGraphError

    module = importlib.import_module(f"gradgraph.studies.{study}")
    monkeypatch.setattr(module, "load_model", lambda *a, **k: pytest.fail("loaded the model before refusing"))
    with pytest.raises(GradGraphError, match="must be|must lie|more than"):
        module.run(module.Config(out=str(tmp_path / "out"), **config))
    assert not (tmp_path / "out").exists()


def test_heads_refuses_an_empty_prompts_file_before_the_model_loads(tmp_path, monkeypatch):
    from gradgraph import GradGraphError
    from gradgraph.studies import head_ranking

    (tmp_path / "p.txt").write_text("\n")
    monkeypatch.setattr(head_ranking, "load_model", lambda *a, **k: pytest.fail("loaded the model before refusing"))
    with pytest.raises(GradGraphError, match="has no prompts"):
        head_ranking.run(head_ranking.Config(prompts=str(tmp_path / "p.txt"), good=" are", bad=" is"))
