"""`gradgraph explain` and the attr-eval study on the embedded model: what they print and write,
and clear errors for words the vocabulary lacks."""

import math

import pytest

from gradgraph.cli import main
from gradgraph.studies import attr_eval

from conftest import no_hooks_left


@pytest.mark.real
def test_explain_prints_scores_and_writes_a_figure(tmp_path, capsys, smol_model):
    figure = tmp_path / "explain.png"
    args = ["explain", "The keys to the cabinet", "--bad", " is", "--figure", str(figure)]
    assert main(args + ["--good", " antidisestablishmentarianism"]) == 2
    assert "not one" in capsys.readouterr().err and not figure.exists()
    assert main(args + ["--good", " are", "--method", "ig", "grad_x_input", "--steps", "4"]) == 0
    out = capsys.readouterr().out
    assert "straight (gausslegendre, 4 steps)" in out and "grad_x_input" in out and "delta =" in out
    assert "'<|im_start|>'[+0.000]" in out  # BOS is not attributed
    assert figure.stat().st_size > 1000


@pytest.mark.real
def test_attr_eval_rows_on_one_sva_item(smol_model, tmp_path):
    config = attr_eval.Config(sva_items=1, corpus=3, steps=3, samples=2, out=str(tmp_path / "out"),
                              figures=str(tmp_path / "out" / "figures"))
    examples, corpus = attr_eval._sva(smol_model, config)
    result = attr_eval.evaluate(smol_model, "SVA", examples, corpus, config, smol_model.tokenizer.pad_token_id)
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == list(attr_eval.methods(config))
    for row in rows.values():
        assert row["n"] == 1 and all(math.isfinite(row[m]) for m in attr_eval.METRICS)
        assert -1 <= row["comprehensiveness"] <= 1 and row["seconds_per_example"] > 0
    assert rows["IG"]["mean_abs_delta"] < rows["saliency"]["mean_abs_delta"]  # IG is (nearly) complete
    assert no_hooks_left(smol_model)
    result["first"]["words"] = [smol_model.tokenizer.decode([t]) for t in result["first"]["tokens"]]
    attr_eval.write(config, dict(config={}, results={"SVA": result}, knn_seconds=0.0, seconds=1.0))
    table = (tmp_path / "out" / "evaluation.md").read_text()
    assert "| SVA | UDIG (maxcount) | 1 |" in table
    for name in ("attr_eval_metrics.png", "attr_eval_tokens_sva.png"):
        assert (tmp_path / "out" / "figures" / name).stat().st_size > 1000
