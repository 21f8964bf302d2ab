"""The command line: models, sva-eval, and its errors."""

import json

import pytest

from gradgraph.cli import main
from gradgraph.evaluate import take


def test_models_lists_embedded(capsys):
    from gradgraph.arch.models import EMBEDDED

    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    listed = [line.split()[0] for line in lines[1 : 1 + len(EMBEDDED)]]
    assert listed == list(EMBEDDED)
    for entry in EMBEDDED.values():
        assert any(entry.description in line for line in lines)


def test_limit_zero_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["sva-eval", "--limit", "0"])
    assert "positive integer" in capsys.readouterr().err


def test_unknown_model_exits_with_message(capsys):
    assert main(["sva-eval", "--model", "no-such-model", "--limit", "2"]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_take_spreads_over_cells(smol_tokenizer):
    from gradgraph.data import sva_items

    items = take(sva_items(smol_tokenizer), 40)
    assert len(items) == 40
    assert len({(i.condition, i.n_attractors) for i in items}) == 10
    assert sum(i.subject_number == "sg" for i in items) == 20


@pytest.mark.real
def test_sva_eval_end_to_end(tmp_path, capsys, smol_model):
    assert main(["sva-eval", "--limit", "20", "--out", str(tmp_path / "r"), "--figures", str(tmp_path / "f")]) == 0
    out = capsys.readouterr().out
    assert "simple" in out and "accuracy" in out
    rows = json.loads((tmp_path / "r" / "items.json").read_text())
    assert len(rows) == 20 and all(r["correct"] == (r["logit_diff"] > 0) for r in rows)
    table = json.loads((tmp_path / "r" / "accuracy.json").read_text())
    assert table[-1]["condition"] == "all" and table[-1]["n"] == 20
    assert (tmp_path / "f" / "sva_eval_accuracy.png").stat().st_size > 5000
