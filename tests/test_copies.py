"""A norm on per-head copies of the residual stream (ln1 before q, k and v) is the same for every
copy, so a pass may ⊕ the copies' values at its output first and go through it once
(``GradGraph.copies``): on every family, under every semiring and rule set, the values outside the
norm equal those of a pass that goes through every copy (one that keeps the norm's nodes)."""

import pytest
import torch

from gradgraph import backprop
from gradgraph.arch.models import FAMILIES
from gradgraph.build import assemble, record
from gradgraph.semirings import Abs, Entropy, KMax, Log, Max, Real

from test_families import family_model, prompts


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_norm_on_copies_runs_once_with_the_same_values(family):
    model = family_model(family, n_layers=2, seed=5)
    tokens, mask, metric = prompts(family)
    recording = record(model, tokens, metric, attention_mask=mask)
    for rules, semirings in (("gradient", (Real, Abs, Max, Entropy, KMax(2), Log)), ("attn-lrp", (Real, Max)),
                             ("cp-lrp", (Real,)), ("chefer2021", (Real,))):
        graph = assemble(recording, rules)
        norms = {n for _, _, nodes in graph.copies for n in nodes}
        before = family not in ("olmo2", "no-norm", "bert")  # a norm before attention (OLMo-2's and BERT's come after)
        assert len(graph.copies) == (3 * model.cfg.n_layers if before else 0), (family, rules)
        outside = [n for n in graph.order if n not in norms]
        for sr in semirings:
            once = backprop(graph, sr, keep=outside)
            every = backprop(graph, sr, keep=graph.order)  # the norms' nodes kept: each copy on its own
            scale = max(float(v.abs().nan_to_num(0).max()) for v in every.values() if v.numel())
            for node in outside:
                assert once[node].shape == every[node].shape, (family, rules, sr.name, node)
                both = torch.isinf(once[node]) & torch.isinf(every[node]) & (once[node] == every[node])
                diff = (once[node] - every[node]).masked_fill(both, 0).nan_to_num(0).abs().max()
                assert diff <= 1e-10 * max(scale, 1.0), (family, rules, sr.name, node, float(diff))


def test_the_maps_into_the_copies_sum_them_in_their_product(monkeypatch):
    """q, k and v read ln1's copies through shared matrices: their product over (head, dim) gives the
    ⊕ over copies at once, in every semiring."""
    from gradgraph.graph import Matmul
    from gradgraph.semirings import Count, SignedMax

    summed, original = [], Matmul.summed
    monkeypatch.setattr(Matmul, "summed", lambda self, sr, value: summed.append(1) or original(self, sr, value))
    model = family_model("llama", n_layers=2, seed=5)
    tokens, mask, metric = prompts("llama")
    graph = assemble(record(model, tokens, metric, attention_mask=mask))
    for sr in (Real, Max, Entropy, KMax(2), Log, Abs, SignedMax, Count):
        summed.clear()
        once, every = backprop(graph, sr, keep=graph.sources), backprop(graph, sr, keep=graph.order)
        assert len(summed) == 6, sr.name  # q, k, v in each of two layers
        a, b = once["hook_embed"], every["hook_embed"]
        assert torch.allclose(a.nan_to_num(0), b.nan_to_num(0), rtol=1e-10, atol=1e-12), sr.name
