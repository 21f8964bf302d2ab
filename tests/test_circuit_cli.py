"""``gradgraph circuit`` (on SmolLM2's architecture and tokenizer with two random layers, what the
tests run every study on): the tables, curves, figure and circuits it writes, the other files of
its folder kept, and the same tables drawn again from what it saved."""

import csv
import json

from gradgraph.cli import main


def test_the_circuit_command_writes_its_tables_and_circuits(tmp_path, capsys):
    out = tmp_path / "circuit"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["circuit", "--model", "tiny-smollm2", "--items", "4", "--methods", "eap,random", "--resamples", "20",
                 "--size", "0.2", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "cpr_cmd.csv")))
    assert [(r["method"], r["x_axis"]) for r in rows] == [("eap", "fixed"), ("eap", "own"), ("random", "fixed"), ("random", "own")]
    assert all(float(r["CPR_low"]) <= float(r["CPR_high"]) for r in rows)
    curves = list(csv.DictReader(open(out / "curves.csv")))
    full = [r for r in curves if r["size"] == "1.0"]
    assert len(curves) == 2 * 2 * 10 and all(abs(float(r["faithfulness"]) - 1) < 1e-4 for r in full)
    graph = json.loads((out / "circuits" / "eap.json").read_text())
    assert set(graph) == {"cfg", "nodes", "edges"} and graph["cfg"]["n_layers"] == 2
    assert 0 < sum(e["in_graph"] for e in graph["edges"].values())
    assert (out / "figures" / "circuit_faithfulness.png").stat().st_size > 10_000
    assert (out / "notes.txt").read_text() == "mine"
    printed = capsys.readouterr().out
    assert main(["circuit", "--redraw", str(out)]) == 0
    assert list(csv.DictReader(open(out / "cpr_cmd.csv"))) == rows and "CPR" in printed
    for bad in (["--task", "prompts"], ["--methods", "acdc"], ["--size", "0"]):
        assert main(["circuit", "--model", "tiny-smollm2", *bad, "--out", str(tmp_path / "other")]) == 2
    errors = capsys.readouterr().err
    assert "needs --prompts" in errors and "unknown methods" in errors and "--size" in errors
    assert not (tmp_path / "other").exists()


def test_counterfactuals_the_tokenizer_splits_otherwise_are_refused(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("When Mary and John went to the store, John gave a drink to\n")
    (tmp_path / "c.txt").write_text("When Bartholomew and Alice went to the store, Carol gave a drink to\n")
    assert main(["circuit", "--model", "tiny-smollm2", "--task", "prompts", "--prompts", str(tmp_path / "p.txt"),
                 "--counterfactuals", str(tmp_path / "c.txt"), "--good", " Mary", "--bad", " John",
                 "--out", str(tmp_path / "out")]) == 2
    assert "as many tokens as its prompt" in capsys.readouterr().err and not (tmp_path / "out").exists()
