"""Graphs after a cached prefix: the same values as the whole graph at the positions after it, under
every positionwise rule set and every semiring; conservation counts the prefix's keys and values."""

import pytest
import torch

from gradgraph import GradGraphError, backprop, build_graph, tiny_model
from gradgraph.attribution import attention_rollout, chefer_rollout, raw_attention, relevance
from gradgraph.build import after_prefix, assemble, record
from gradgraph.metrics import logit_diff
from gradgraph.rules import ATTN_LRP, CHEFER2021, CP_LRP, GRADIENT, RELP
from gradgraph.semirings import Entropy, Max

from conftest import no_hooks_left
from test_semiring_reference import SEMIRINGS, assert_matches, backward_dp

METRIC = logit_diff(torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6]))
P0 = 5  # prefix length


def _case(arch, seed=0, **cfg):
    """A model, a prefix [P0], what follows it [3, 6] (right-padded) and the whole sequences."""
    model = tiny_model(arch, dtype=torch.float64, seed=seed, **cfg)
    generator = torch.Generator().manual_seed(seed)
    prefix = torch.randint(0, 50, (P0,), generator=generator)
    after = torch.randint(0, 50, (3, 6), generator=generator)
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, 4:], mask[2, 5:] = 0, 0
    whole = torch.cat([prefix[None].expand(3, -1), after], 1)
    whole_mask = torch.cat([torch.ones(3, P0, dtype=torch.long), mask], 1)
    return model, prefix, after, mask, whole, whole_mask


def _assert_same_after_prefix(short, long, short_values, long_values, atol=1e-11) -> int:
    """Every node indexed by position: the short graph's values equal the long one's after the prefix
    (at real positions). Returns how many nodes were compared."""
    compared = 0
    real = short.source_mask
    for node in short.order:
        shape = short.shapes[node]
        if node not in long.shapes or len(shape) < 2 or long.shapes[node][1] != shape[1] + short.prefix - long.prefix:
            continue
        a, b = short_values[node][0], long_values[node][0][:, short.prefix - long.prefix:]
        at = real.reshape(real.shape + (1,) * (a.ndim - 2))
        assert torch.allclose(a * at, b * at, atol=atol, rtol=0), node
        compared += 1
    return compared


@pytest.mark.parametrize("rules", [GRADIENT, ATTN_LRP, CP_LRP, RELP])
@pytest.mark.parametrize("case", [dict(arch="gpt2"), dict(arch="llama", seed=1, n_heads=4, n_key_value_heads=2),
                                  dict(arch="pythia", seed=2), dict(arch="olmo2", seed=4),
                                  dict(arch="gemma2", seed=3, window_size=4, attn_scores_soft_cap=0.5,
                                       output_logits_soft_cap=0.3)],
                         ids=["gpt2", "llama-gqa", "pythia", "olmo2-refused", "gemma2-local"])
def test_values_after_a_prefix_equal_the_whole_graphs(rules, case):
    if case["arch"] == "olmo2":  # q/k norms: refused by name
        model, prefix, after, mask, _, _ = _case(**case)
        with pytest.raises(GradGraphError, match="q/k normalisation"):
            build_graph(model, after, METRIC, attention_mask=mask, rules=rules, prefix=prefix)
        assert no_hooks_left(model)
        return
    model, prefix, after, mask, whole, whole_mask = _case(**case)
    short = build_graph(model, after, METRIC, attention_mask=mask, rules=rules, prefix=prefix)
    long = build_graph(model, whole, METRIC, attention_mask=whole_mask, rules=rules)
    assert short.prefix == P0 and len(short.cached) == 2 * model.cfg.n_layers
    assert torch.allclose(short.metric_value, long.metric_value, atol=1e-12)
    assert _assert_same_after_prefix(short, long, backprop(short), backprop(long)) > 20
    # the same graph sliced from a recording of the whole sequences (no second forward pass)
    sliced = assemble(after_prefix(record(model, whole, METRIC, attention_mask=whole_mask), P0), rules)
    assert _assert_same_after_prefix(sliced, long, backprop(sliced), backprop(long)) > 20
    assert no_hooks_left(model)


@pytest.mark.parametrize("sr_name", list(SEMIRINGS))
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_every_semiring_equals_the_reference_on_a_prefix_graph(arch, sr_name):
    model = tiny_model(arch, n_layers=1, d_model=4, n_heads=2, d_head=2, d_mlp=4, n_ctx=8, d_vocab=8,
                       dtype=torch.float64, seed=3)
    graph = build_graph(model, torch.tensor([[3, 1], [2, 0]]), logit_diff(1, 2),
                        attention_mask=torch.tensor([[1, 1], [1, 0]]), prefix=torch.tensor([5, 6]))
    scalar = graph.to_networkx()
    assert any(n[0] == graph.cached[0] for n in scalar if isinstance(n, tuple))
    assert_matches(graph, scalar, backprop(graph, SEMIRINGS[sr_name]), backward_dp(scalar), sr_name, "backprop")


def test_conservation_counts_the_prefix_keys_and_values():
    model, prefix, after, mask, *_ = _case("llama", seed=2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.split(".")[-1].startswith("b"):
                p.zero_()
    result = relevance(build_graph(model, after, METRIC, attention_mask=mask, rules=CP_LRP, prefix=prefix))
    assert torch.allclose(result.delta, torch.zeros(3, dtype=torch.float64), atol=1e-10)
    assert result.scores.sum(1).sub(result.target).abs().max() > 1e-3  # the tokens alone do not conserve
    assert all(d.abs().max() < 1e-10 for d in result.cut_deltas.values())


def test_attention_maps_after_a_prefix_equal_the_whole_graphs():
    model, prefix, after, mask, whole, whole_mask = _case("gpt2", seed=4)
    recording = record(model, whole, METRIC, attention_mask=whole_mask)
    long_gradient, chefer = assemble(recording), assemble(recording, CHEFER2021)
    short_gradient = assemble(after_prefix(recording, P0))
    for method in (raw_attention, attention_rollout):
        assert torch.allclose(method(short_gradient).scores, method(long_gradient).scores[:, P0:], atol=1e-12)
    long_map = chefer_rollout(long_gradient, chefer).scores
    assert torch.allclose(chefer_rollout(short_gradient, chefer).scores, long_map[:, P0:], atol=1e-12)
    assert long_map[:, P0:].abs().sum() > 0


def test_bad_prefixes_are_refused():
    model, prefix, after, mask, whole, whole_mask = _case("llama", seed=5)
    with pytest.raises(GradGraphError, match="whole sequence"):
        build_graph(model, after, METRIC, attention_mask=mask, rules=CHEFER2021, prefix=prefix)
    with pytest.raises(GradGraphError, match="tensor of the token ids"):
        build_graph(model, ["a b"], METRIC, prefix=prefix)
    with pytest.raises(GradGraphError, match="1-D tensor"):
        build_graph(model, after, METRIC, prefix=prefix[None])
    with pytest.raises(GradGraphError, match="token ids must lie"):
        build_graph(model, after, METRIC, prefix=torch.tensor([1, 99]))
    recording = record(model, whole, METRIC, attention_mask=whole_mask)
    differing = whole.clone()
    differing[0, 1] = (differing[0, 1] + 1) % 50
    with pytest.raises(GradGraphError, match="differ"):
        after_prefix(record(model, differing, METRIC), P0)
    with pytest.raises(GradGraphError, match="at least one token"):
        after_prefix(recording, whole.shape[1])
    with pytest.raises(GradGraphError, match="already"):
        after_prefix(after_prefix(recording, 2), 1)
    assert no_hooks_left(model)


def test_top_paths_and_entropy_run_on_a_prefix_graph():
    from gradgraph.paths import path_entropy, top_paths

    model, prefix, after, mask, *_ = _case("llama", seed=6)
    graph = build_graph(model, after[:1], logit_diff(1, 4), prefix=prefix)
    best = top_paths(graph, k=2)[0]
    assert best and all(p.nodes[0][0] in graph.sources for p in best)
    assert torch.isfinite(path_entropy(graph)).all()
    assert backprop(graph, Max)[graph.cached[0]].max() > 0 and backprop(graph, Entropy)[graph.sources[0]].isfinite().all()
