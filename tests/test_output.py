"""Writing results never loses a user's data: foreign files stay, failed runs leave the previous
results whole, and a run replaces only what the previous run of its command wrote."""

import json

import pytest

from gradgraph.studies.output import MANIFEST, staged_run


def _run(out, figures, files: dict[str, str], figure_files: dict[str, str] = (), fail: bool = False):
    with staged_run(out, figures, "test") as staging:
        for name, text in files.items():
            staging.path(name).write_text(text)
        for name, text in dict(figure_files).items():
            staging.figure(name).write_text(text)
        if fail:
            raise RuntimeError("the run failed")


def _siblings(folder):
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith("."))


def test_fresh_folder_and_a_second_run_replace_only_our_files(tmp_path):
    out, figures = tmp_path / "out", tmp_path / "figures"
    _run(out, figures, {"a.csv": "1", "sub/b.json": "2"}, {"plot.png": "old"})
    assert (out / "a.csv").read_text() == "1" and (out / "sub" / "b.json").read_text() == "2"
    assert json.loads((out / MANIFEST).read_text())["files"] == ["a.csv", "sub/b.json"]
    _run(out, figures, {"c.csv": "3"}, {"plot.png": "new"})
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST, "c.csv"])  # a.csv and sub/ were ours
    assert (figures / "plot.png").read_text() == "new"
    assert _siblings(out) == []  # no staging folder left behind


def test_a_file_the_run_did_not_write_is_kept(tmp_path):
    out, figures = tmp_path / "home", tmp_path / "figures"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    (out / "notes").mkdir()
    (out / "notes" / "todo.txt").write_text("keep")
    _run(out, figures, {"a.csv": "1"})
    _run(out, figures, {"b.csv": "2"})
    assert (out / "thesis.tex").read_text() == "years of work" and (out / "notes" / "todo.txt").read_text() == "keep"
    assert not (out / "a.csv").exists() and (out / "b.csv").read_text() == "2"
    assert set(json.loads((out / MANIFEST).read_text())["files"]) == {"b.csv"}
    (figures / "mine.png").parent.mkdir(exist_ok=True)
    (figures / "mine.png").write_text("user figure")
    _run(out, figures, {"b.csv": "3"}, {"other.png": "x"})
    assert (figures / "mine.png").read_text() == "user figure"  # figures are never deleted
    assert _siblings(out) == []


def test_a_failed_run_leaves_the_previous_results_whole(tmp_path):
    out, figures = tmp_path / "out", tmp_path / "figures"
    _run(out, figures, {"a.csv": "1", "b.csv": "2"}, {"plot.png": "v1"})
    with pytest.raises(RuntimeError, match="the run failed"):
        _run(out, figures, {"a.csv": "changed"}, {"plot.png": "v2"}, fail=True)
    assert (out / "a.csv").read_text() == "1" and (out / "b.csv").read_text() == "2"
    assert (figures / "plot.png").read_text() == "v1"
    assert _siblings(out) == []
    with pytest.raises(RuntimeError):
        _run(tmp_path / "never", figures, {"a.csv": "1"}, fail=True)
    assert not (tmp_path / "never").exists()


def test_figures_inside_the_output_folder_belong_to_the_run(tmp_path):
    out = tmp_path / "out"
    _run(out, out / "figures", {"a.csv": "1"}, {"p.png": "1"})
    assert (out / "figures" / "p.png").read_text() == "1"
    assert "figures/p.png" in json.loads((out / MANIFEST).read_text())["files"]
    _run(out, out / "figures", {"a.csv": "2"}, {"q.png": "2"})
    assert not (out / "figures" / "p.png").exists() and (out / "figures" / "q.png").exists()


def test_a_failed_output_is_reported_and_the_rest_published(tmp_path, capsys):
    from gradgraph.errors import OutputIncomplete
    from gradgraph.studies.saved import load

    out, figures = tmp_path / "out", tmp_path / "out" / "figures"
    _run(out, figures, {"old.csv": "previous run"})
    with pytest.raises(OutputIncomplete) as caught:
        with staged_run(out, figures, "gradgraph test") as staging:
            staging.save({"scores": [1.5, float("nan")], "label": ("a", 2)})
            staging.make("a.csv", lambda: staging.path("a.csv").write_text("1"))
            assert staging.make("b.png", lambda: 1 / 0) is None
            staging.make("c.csv", lambda: staging.path("c.csv").write_text("3"))
    message = str(caught.value)
    assert "1 output(s) of gradgraph test failed" in message and "b.png: ZeroDivisionError" in message
    assert f"gradgraph test --redraw {out}" in message and "ZeroDivisionError" in capsys.readouterr().err
    assert (out / "a.csv").read_text() == "1" and (out / "c.csv").read_text() == "3"
    assert not (out / "old.csv").exists()  # the previous run's, replaced by this run's results
    saved = load(out, command="gradgraph test")
    assert saved["label"] == ("a", 2) and saved["scores"][0] == 1.5 and saved["scores"][1] != saved["scores"][1]
    assert _siblings(out) == []


def test_an_exception_after_the_results_were_saved_still_publishes_them(tmp_path):
    from gradgraph.errors import OutputIncomplete

    out = tmp_path / "out"
    with pytest.raises(OutputIncomplete, match="the rest of the output: KeyError"):
        with staged_run(out, out / "figures", "gradgraph test") as staging:
            staging.save({"x": 1})
            staging.path("a.csv").write_text("1")
            raise KeyError("report")
    assert (out / "a.csv").read_text() == "1" and (out / "computed" / "result.json").is_file()


def test_saved_results_round_trip(tmp_path):
    import numpy as np
    import torch

    from gradgraph.branches import BranchShares
    from gradgraph.studies.saved import load, save
    from gradgraph.studies.sva import Config

    value = dict(config=Config(limit=3, methods=("flow",)), tensor=torch.arange(6.0).view(2, 3),
                 array=np.array([1, 2], dtype=np.int64), nested={"a": [None, True, "s", (1, 2.5)]},
                 keys={(1, "x"): "tuple key", 3: "int key"},
                 shares=BranchShares(torch.ones(2, 4), {"q": torch.zeros(2, 3)}, "oplus", "Max"))
    save(value, tmp_path / "computed", command="gradgraph sva")
    loaded = load(tmp_path, command="gradgraph sva")
    assert loaded["config"] == value["config"] and torch.equal(loaded["tensor"], value["tensor"])
    assert np.array_equal(loaded["array"], value["array"]) and loaded["nested"] == value["nested"]
    assert loaded["keys"] == value["keys"] and torch.equal(loaded["shares"].head_value["q"], torch.zeros(2, 3))
    from gradgraph import GradGraphError

    with pytest.raises(GradGraphError, match="cannot save a value of type object"):
        save({"x": object()}, tmp_path / "other", command="gradgraph sva")
