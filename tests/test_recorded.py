"""The recording forward from the weights gives every hook point TransformerLens' recording gives,
with the same values, on every layout it covers; the others are recorded through the hooks."""

import pytest
import torch

from gradgraph import tiny_model
from gradgraph.arch import hooks, recorded
from gradgraph.arch.models import FAMILIES

COVERED = [f for f in FAMILIES if recorded.covers(tiny_model(f, n_layers=1))]


def _hooked(model, tokens, embed=None):
    replacements = {} if embed is None else {"hook_embed": embed}
    with torch.no_grad(), hooks.replacing(model, replacements), hooks.recording(model) as store:
        logits = model(tokens)
    return logits, hooks.node_firings(store)


def test_the_plain_layouts_are_covered_and_the_rest_are_not():
    assert {"gpt2", "llama"} <= set(COVERED)
    assert not {"pythia", "gptj", "phi", "gemma2", "qwen3", "olmo2", "solu", "bert", "attn-only"} & set(COVERED)


@pytest.mark.parametrize("family", COVERED)
def test_every_hook_point_as_transformer_lens_records_it(family):
    model = tiny_model(family, n_layers=2, dtype=torch.float64, seed=3)
    tokens = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    embed = torch.randn(2, 7, model.cfg.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for given in (None, embed):
        ref_logits, ref = _hooked(model, tokens, given)
        for keep in (True, False):
            logits, acts = recorded.recorded(model, tokens, given, keep_patterns=keep)
            patterns = {n for n in ref if n.endswith(("hook_attn_scores", "hook_pattern"))}
            assert set(acts) == (set(ref) if keep else set(ref) - patterns)
            for node, tensor in acts.items():
                assert tensor.shape == ref[node].shape, node
                both_inf = torch.isinf(tensor) & (tensor == ref[node])
                diff = torch.where(both_inf, 0, tensor - ref[node]).abs().max()
                assert diff <= 1e-12 * max(1.0, float(ref[node].abs().nan_to_num(0, 0, 0).max())), (family, keep, node)
            assert torch.allclose(logits, ref_logits, rtol=0, atol=1e-12)


def test_rotary_positions_past_the_models_tables():
    """The embedded model keeps rotary tables for 2,048 positions and a context of 8,192: past the
    tables, the rotation is the model's own formula."""
    short, full = (tiny_model("llama", n_layers=2, dtype=torch.float64, n_ctx=64, seed=1) for _ in range(2))
    for block in short.blocks:
        block.attn.rotary_cos, block.attn.rotary_sin = block.attn.rotary_cos[:16].clone(), block.attn.rotary_sin[:16].clone()
    tokens = torch.randint(0, 50, (1, 40), generator=torch.Generator().manual_seed(0))
    _, ref = _hooked(full, tokens)
    _, acts = recorded.recorded(short, tokens, None, keep_patterns=False)
    assert max(float((acts[n] - ref[n]).abs().max()) for n in acts) < 1e-12


def test_a_graph_past_the_models_rotary_tables_equals_autograd():
    from gradgraph import backprop, build_graph
    from gradgraph.metrics import logit_diff

    model = tiny_model("llama", n_layers=2, dtype=torch.float64, n_ctx=64, seed=1)
    for block in model.blocks:
        block.attn.rotary_cos, block.attn.rotary_sin = block.attn.rotary_cos[:16].clone(), block.attn.rotary_sin[:16].clone()
    tokens = torch.randint(0, 50, (1, 40), generator=torch.Generator().manual_seed(0))
    graph = build_graph(model, tokens, logit_diff(1, 2))
    grad = backprop(graph, keep=graph.sources)[graph.sources[0]][0]
    embed = model.W_E.detach()[tokens].clone().requires_grad_(True)
    full = tiny_model("llama", n_layers=2, dtype=torch.float64, n_ctx=64, seed=1)
    with hooks.replacing(full, {"hook_embed": embed}):
        logits = full(tokens)
    (logits[:, -1, 1] - logits[:, -1, 2]).sum().backward()
    assert torch.allclose(grad, embed.grad, rtol=0, atol=1e-10)


@pytest.mark.parametrize("family", COVERED)
def test_float32_recording_rounds_as_transformer_lens_does(family):
    """The same products in the same layouts (HF's, as TransformerLens 3.9 multiplies them): float32
    values identical, so that a graph recorded either way is the same graph."""
    model = tiny_model(family, n_layers=2, seed=3)
    tokens = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    _, ref = _hooked(model, tokens)
    _, acts = recorded.recorded(model, tokens, None, keep_patterns=True)
    assert [n for n in acts if not torch.equal(acts[n], ref[n])] == []


@pytest.mark.parametrize("family", COVERED)
def test_a_metric_of_one_position_per_row_is_recorded_as_the_whole_logits_give_it(family):
    """``logit_diff`` reads one position per row: the recording makes the logits only there (and the
    kept columns everywhere), with the same value, gradient and kept logits as the whole logits give."""
    from gradgraph.build import record
    from gradgraph.metrics import logit_diff, logprob_diff

    model = tiny_model(family, n_layers=2, dtype=torch.float64, seed=3)
    tokens = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(tokens)
    mask[1, 5:] = 0
    for at in (logit_diff(3, 4, pos=torch.tensor([-1, -1, 2])), logprob_diff(3, 4)):
        ours = record(model, tokens, at, attention_mask=mask)
        whole = record(model, tokens, lambda logits, m, at=at: at(logits, m), attention_mask=mask)
        assert ours.grad_logits.shape == whole.grad_logits.shape and torch.equal(ours.logit_ids, whole.logit_ids)
        assert torch.allclose(ours.metric_value, whole.metric_value, rtol=0, atol=1e-12)
        assert torch.allclose(ours.grad_logits, whole.grad_logits, rtol=0, atol=1e-12)
        assert torch.allclose(ours.activations["unembed.hook_out"], whole.activations["unembed.hook_out"],
                              rtol=0, atol=1e-12)
        assert set(ours.activations) == set(whole.activations)
