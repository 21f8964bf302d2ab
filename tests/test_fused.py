"""The fused pass (one autograd pass to the inputs) equals the graph's Real recursion under every
rule set it covers, on every family it covers, padded batches included; what it does not cover
goes through the graph, and bad input gets a clear error."""

import pytest
import torch

from gradgraph import GradGraphError, backprop, build_graph, lrp
from gradgraph import fused, integrated
from gradgraph.arch import names
from gradgraph.arch.models import FAMILIES
from gradgraph.attribution import cuts
from gradgraph.metrics import AtPosition, logit_diff, logprob_diff
from gradgraph.rules import ATTN_LRP, CHEFER2021, CP_LRP, GRADIENT, attn_lrp
from gradgraph.semirings import Real

from conftest import no_hooks_left
from test_families import family_model, prompts

FUSED = ("gradient", "attn-lrp", "cp-lrp", "relp", "relp+ah")
COVERED = ("gpt2", "llama", "gemma")  # the weights forward's layout; every other family has a feature beyond it


def test_the_families_it_covers():
    assert [f for f in FAMILIES if fused.covers(family_model(f, n_layers=1), GRADIENT)] == list(COVERED)


@pytest.mark.parametrize("family", COVERED)
@pytest.mark.parametrize("rules", FUSED)
def test_fused_equals_the_graph_at_the_inputs_and_every_cut(family, rules):
    model = family_model(family, n_layers=3, seed=5)
    tokens, mask, metric = prompts(family)
    graph = build_graph(model, tokens, metric, attention_mask=mask, rules=rules)
    grads = backprop(graph, Real)
    one = fused.input_values(model, tokens, metric, rules=rules, attention_mask=mask, cuts=True)
    assert torch.allclose(one.metric_value, graph.metric_value, atol=1e-12, rtol=0)
    assert set(one.grads) == set(names.inputs(model))
    scale = max(grads[n][0].abs().max().item() for n in graph.sources)
    for node in graph.sources:
        assert torch.allclose(one.grads[node], grads[node][0], atol=1e-10 * scale, rtol=0), (node, rules)
    assert set(one.cut_sums) == set(cuts(graph))
    for node in cuts(graph):
        expected = (grads[node][0] * graph.activations[node]).flatten(1).sum(1)
        assert torch.allclose(one.cut_sums[node], expected, atol=1e-10, rtol=0), (node, rules)
    assert one.grads[names.name("embed")].abs().sum() > 0
    assert no_hooks_left(model)


@pytest.mark.parametrize("pos", [-1, 2, "per row"])
def test_a_metric_of_one_position_per_row_unembeds_only_there(pos):
    model = family_model("llama", n_layers=2, seed=3)
    tokens, mask, _ = prompts("llama")
    pos = torch.tensor([-1, 1] + [-2] * (len(tokens) - 2)) if pos == "per row" else pos
    for at in (logit_diff(1, 4, pos=pos), logprob_diff(1, 4, pos=pos)):
        assert isinstance(at, AtPosition)
        whole = lambda logits, m, at=at: at(logits, m)  # noqa: E731  the same metric, read from every position
        ours, reference = (fused.input_values(model, tokens, metric, rules=ATTN_LRP, attention_mask=mask, cuts=True)
                           for metric in (at, whole))
        assert torch.allclose(ours.metric_value, reference.metric_value, atol=1e-12, rtol=0)
        for node in ours.grads:
            assert torch.allclose(ours.grads[node], reference.grads[node], atol=1e-12, rtol=0)
        for node in ours.cut_sums:
            assert torch.allclose(ours.cut_sums[node], reference.cut_sums[node], atol=1e-12, rtol=0)
    with pytest.raises(GradGraphError, match="outside prompt"):
        fused.input_values(model, tokens, logit_diff(1, 4, pos=40), rules=GRADIENT, attention_mask=mask)
    assert no_hooks_left(model)


@pytest.mark.parametrize("rules", ["attn-lrp", "cp-lrp"])
def test_lrp_asks_only_for_the_inputs_and_agrees_with_the_whole_graph(rules):
    model = family_model("llama", n_layers=2, seed=3)
    tokens, mask, metric = prompts("llama")
    quick = lrp(model, tokens, metric, rules=rules, attention_mask=mask)
    whole = lrp(model, tokens, metric, rules=rules, attention_mask=mask, keep="all")
    assert quick.graph is None and whole.graph is not None and set(quick.values) == set(names.inputs(model))
    assert quick.method == whole.method == rules
    for field in ("scores", "target", "delta"):
        assert torch.allclose(getattr(quick, field), getattr(whole, field), atol=1e-10, rtol=0), field
    assert quick.cut_deltas.keys() == whole.cut_deltas.keys()
    for node, delta in whole.cut_deltas.items():
        assert torch.allclose(quick.cut_deltas[node], delta, atol=1e-10, rtol=0), node
    with pytest.raises(GradGraphError, match="keep='all'"):
        quick.by_component()
    some = lrp(model, tokens, metric, rules=rules, attention_mask=mask, keep=["blocks.1.hook_mlp_out"])
    assert torch.allclose(some.values["blocks.1.hook_mlp_out"], whole.values["blocks.1.hook_mlp_out"], atol=1e-12)


def test_rule_sets_without_an_autograd_form_go_through_the_graph():
    assert fused.backward_of(CHEFER2021) is None and fused.backward_of(attn_lrp(0.1)) is None
    attn = fused.backward_of(ATTN_LRP)
    assert attn.scale_held and attn.identity and attn.qk == attn.pv == attn.gate == (0.5, 0.5)
    cp = fused.backward_of(CP_LRP)
    assert cp.qk == (0.0, 0.0) and cp.pv == (0.0, 1.0) and cp.gate == (0.0, 1.0)
    model = family_model("llama", n_layers=2, seed=3)
    tokens, mask, metric = prompts("llama")
    assert not fused.covers(model, ATTN_LRP, head_mask=torch.ones(2, 4, dtype=torch.bool))
    assert not fused.covers(family_model("qwen3", n_layers=1), ATTN_LRP)
    eps = lrp(model, tokens, metric, rules=attn_lrp(0.1), attention_mask=mask)  # the graph, inputs only
    assert eps.graph is None and set(eps.values) == set(names.inputs(model))
    with pytest.raises(GradGraphError, match="no fused pass"):
        fused.input_values(model, tokens, metric, rules=CHEFER2021, attention_mask=mask)


def test_path_gradients_by_the_fused_pass_equal_the_graph():
    model = family_model("gpt2", n_layers=2, seed=4)
    tokens, _, _ = prompts("gpt2")
    ids, metric = tokens[0], logprob_diff(1, 4)
    rows = model.W_E.detach()[ids][None] * torch.linspace(0, 1, 5, dtype=torch.float64)[:, None, None]
    grads, values = integrated.gradients(model, ids, metric, rows, batch_size=2)
    for r in range(5):
        graph = build_graph(model, ids[None], metric, embed=rows[r:r + 1])
        expected = backprop(graph, keep=["hook_embed"])["hook_embed"][0]
        assert torch.allclose(grads[r:r + 1], expected, atol=1e-11, rtol=0)
        assert torch.allclose(values[r], graph.metric_value[0], atol=1e-12)


def test_bad_inputs_are_refused_and_leave_no_hook():
    model = family_model("llama", n_layers=2, seed=3)
    tokens, mask, metric = prompts("llama")
    with pytest.raises(GradGraphError, match="embed must be"):
        fused.input_values(model, tokens, metric, rules=GRADIENT, embed=torch.zeros(3, 7, 5, dtype=torch.float64))
    with pytest.raises(GradGraphError, match="one value per prompt"):
        fused.input_values(model, tokens, lambda logits: logits.sum(), rules=GRADIENT)
    with pytest.raises(GradGraphError, match="attention_mask"):
        fused.input_values(model, tokens, metric, rules=GRADIENT, attention_mask=mask[:, :3])
    assert no_hooks_left(model)


def test_rotary_tables_are_extended_past_what_the_model_keeps():
    """TransformerLens 3.9 keeps rotary tables for min(n_ctx, 2048) positions and extends them on
    demand (SmolLM2's context is 8,192): the fused pass computes the longer tables by the model's
    own formula."""
    cut, whole = (family_model("llama", n_layers=2, seed=6) for _ in range(2))
    for block in cut.blocks:
        block.attn.rotary_cos, block.attn.rotary_sin = block.attn.rotary_cos[:8], block.attn.rotary_sin[:8]
    tokens = torch.randint(1, 40, (2, 12), generator=torch.Generator().manual_seed(0))
    metric = logprob_diff(1, 4)
    ours, reference = (fused.input_values(m, tokens, metric, rules=ATTN_LRP) for m in (cut, whole))
    assert torch.allclose(ours.grads["hook_embed"], reference.grads["hook_embed"], atol=1e-12, rtol=0)
    with pytest.raises(GradGraphError, match="longer than the model's context"):
        fused.input_values(family_model("gpt2", n_layers=1, n_ctx=8), tokens, metric, rules=GRADIENT)
