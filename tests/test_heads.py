"""Head detection (positional, syntactic) and Mask-LRP's masks."""

import pytest
import torch

from gradgraph import GradGraphError, tiny_model
from gradgraph.arch import names
from gradgraph.heads import mask, positional_heads, syntactic_heads

from conftest import no_hooks_left


def _previous_token(pattern, hook):
    """Head 2 of layer 1 attends to the previous token (the first token to itself)."""
    n = pattern.shape[-1]
    planted = torch.zeros(n, n, dtype=pattern.dtype)
    planted[0, 0] = 1
    planted[torch.arange(1, n), torch.arange(n - 1)] = 1
    pattern = pattern.clone()
    pattern[:, 2] = planted
    return pattern


def test_a_planted_positional_head_is_detected():
    model = tiny_model("gpt2", seed=0, n_heads=4)
    generator = torch.Generator().manual_seed(0)
    corpus = [torch.randint(0, 50, (n,), generator=generator) for n in (5, 9, 12, 7)]
    with model.hooks(fwd_hooks=[(names.name("pattern", 1), _previous_token)]):
        rows = positional_heads(model, corpus, threshold=0.9, batch_size=3)
    assert len(rows) == model.cfg.n_layers * model.cfg.n_heads
    planted = [r for r in rows if r["positional"]]
    assert [(r["layer"], r["head"], r["offset"]) for r in planted] == [(1, 2, 1)]
    assert planted[0]["share"] == 1.0
    assert no_hooks_left(model)


def test_masks_and_bad_inputs():
    model = tiny_model("gpt2", seed=0, n_heads=4)
    positional = [dict(layer=l, head=h, positional=(l, h) == (1, 2)) for l in range(2) for h in range(4)]
    syntactic = [dict(layer=l, head=h, relation="nsubj", syntactic=(l, h) in ((0, 1), (1, 2)))
                 for l in range(2) for h in range(4)]
    both = mask(model, "synt+pos", positional=positional, syntactic=syntactic)
    assert both.dtype == torch.bool and both.shape == (2, 4)
    assert sorted(map(tuple, both.nonzero().tolist())) == [(0, 1), (1, 2)]
    assert mask(model, "pos", positional=positional).sum() == 1
    drawn = mask(model, "random", positional=positional, syntactic=syntactic, seed=3)
    assert drawn.sum() == 2 and torch.equal(drawn, mask(model, "random", n=2, seed=3))
    assert mask(model, "all").all() and not mask(model, "none").any()
    with pytest.raises(GradGraphError, match="8 heads"):
        mask(model, "random", n=9)
    with pytest.raises(GradGraphError, match="unknown mask"):
        mask(model, "syntax")
    with pytest.raises(GradGraphError, match="syntactic_heads"):
        mask(model, "synt")
    with pytest.raises(GradGraphError, match=r"\[0, 1\]"):
        positional_heads(model, [torch.tensor([1, 2])], threshold=1.5)
    with pytest.raises(GradGraphError, match="no sentence"):
        positional_heads(model, ["", "   "])


@pytest.mark.real
def test_syntactic_heads_on_the_embedded_model(smol_model):
    corpus = ["The old man reads a long book quietly.", "She quickly wrote the final letter.",
              "My brother bought a red car.", "The children eat sweet apples."]
    rows = syntactic_heads(smol_model, corpus)
    relations = {r["relation"] for r in rows}
    assert {"nsubj", "obj", "amod"} <= relations
    per = len(rows) // len(relations)
    assert per == smol_model.cfg.n_layers * smol_model.cfg.n_heads
    for r in rows:
        assert 0 <= r["accuracy"] <= 1 and r["syntactic"] == (r["accuracy"] > r["threshold"])
        assert r["threshold"] == pytest.approx(min(1.0, r["baseline"] + 0.1))
    # amod arcs are adjacent here (old man, long book, final letter, red car, sweet apples): baseline 1
    assert [r["baseline"] for r in rows if r["relation"] == "amod"][0] == 1.0
    with pytest.raises(GradGraphError, match="no arc"):
        syntactic_heads(smol_model, ["Hello.", "Yes!"])
    with pytest.raises(GradGraphError, match=r"\[0, 1\]"):
        syntactic_heads(smol_model, corpus, thresholds={"nsubj": -0.2})
    assert no_hooks_left(smol_model)
