"""Ablation, patching and attribution patching: values against naive full runs; model untouched."""

import pytest
import torch

from gradgraph import GradGraphError, backprop, build_graph, tiny_model
from gradgraph.arch import hooks, names
from gradgraph.interventions import activation_means, attribution_patching, intervene
from gradgraph.metrics import logit_diff
from gradgraph.semirings import Real

from conftest import no_hooks_left


def _naive(model, tokens, mask, metric, hook, head, value):
    def replace(activation, hook=None):
        activation = activation.clone()
        if head is None:
            activation[...] = value
        else:
            activation[:, :, head] = value
        return activation

    with model.hooks(fwd_hooks=[(hook, replace)]):
        return metric(model(tokens), mask)


def _clean_and_counterfactual():
    """Two right-padded prompts, their mask, counterfactuals differing at position 1, a metric."""
    tokens = torch.tensor([[3, 4, 5, 6, 7], [8, 9, 10, 11, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    cf = tokens.clone()
    cf[:, 1] = torch.tensor([20, 21])
    return tokens, mask, cf, logit_diff(torch.tensor([1, 2]), torch.tensor([3, 4]))


def test_interventions_match_naive_runs_and_leave_model_unchanged():
    model = tiny_model("llama", dtype=torch.float64, n_layers=3, seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tokens, mask, cf, metric = _clean_and_counterfactual()
    means = activation_means(model, tokens, mask)
    out = intervene(model, tokens, mask, metric, counterfactual=cf, means=means, progress=False)
    clean = metric(model(tokens), mask)
    assert torch.allclose(out["clean"]["metric"], clean)
    assert len(out["mean_ablation"]) == 3 * (4 + 1) and len(out["patching"]) == 15
    with hooks.recording(model) as store:
        model(cf)
    corrupt = hooks.node_firings(store)
    for layer, head in [(0, 1), (2, 3), (1, None)]:
        kind = "z" if head is not None else "mlp_out"
        hook = names.name(kind, layer)
        label = f"L{layer}H{head}" if head is not None else f"MLP{layer}"
        mean = means[hook][head] if head is not None else means[hook]
        expected = _naive(model, tokens, mask, metric, hook, head, mean) - clean
        assert torch.allclose(out["mean_ablation"][label], expected, atol=1e-10)
        patch = corrupt[hook][:, :, head] if head is not None else corrupt[hook]
        expected = _naive(model, tokens, mask, metric, hook, head, patch) - clean
        assert torch.allclose(out["patching"][label], expected, atol=1e-10)
        assert expected.abs().max() > 0
    assert no_hooks_left(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_attribution_patching_is_first_order_patching():
    """For a counterfactual close to the clean run, attribution patching ≈ exact patching."""
    model = tiny_model("gpt2", dtype=torch.float64, seed=4)
    tokens = torch.tensor([[3, 4, 5, 6, 7]])
    mask = torch.ones_like(tokens)
    metric = logit_diff(1, 2)
    graph = build_graph(model, tokens, metric)
    grads = {name: value[0] for name, value in backprop(graph, Real).items()}
    # the same tokens give zero everywhere
    zero = attribution_patching(model, tokens, tokens, grads)
    assert all(v.abs().max() == 0 for v in zero.values())
    # a tiny perturbation of the embedding: compare with exact patching through a scaled copy
    scale = 1e-4
    emb = names.name("embed")

    def nudge(activation):
        return activation * (1 + scale)

    with hooks.replacing(model, {emb: nudge}), hooks.recording(model) as store:
        model(tokens)
    store_cf = hooks.node_firings(store)
    with hooks.recording(model) as store:
        model(tokens)
    clean = hooks.node_firings(store)
    z = names.name("z", 1)
    approx = ((store_cf[z] - clean[z]) * grads[z])[:, :, 2].sum()
    exact = _naive(model, tokens, mask, metric, z, 2, store_cf[z][:, :, 2]) - metric(model(tokens), mask)
    assert abs(exact.item()) > 0
    assert abs(approx.item() - exact.item()) < 1e-3 * abs(exact.item()) + 1e-12


def test_hooks_are_removed_when_an_intervention_raises():
    # a model gradgraph.arch.inference does not cover runs through TransformerLens' hooks
    model = tiny_model("gpt2", dtype=torch.float64, seed=3, parallel_attn_mlp=True)
    tokens = torch.tensor([[3, 4, 5, 6]])
    mask = torch.ones_like(tokens)
    calls = []

    def metric(logits, attention_mask=None):
        calls.append(1)
        if len(calls) > 3:  # fails inside the loop over components, with a replacement hook on
            raise GradGraphError("metric failed on purpose")
        return logits[:, -1, 1] - logits[:, -1, 2]

    means = activation_means(model, tokens, mask)
    with pytest.raises(GradGraphError, match="on purpose"):
        intervene(model, tokens, mask, metric, means=means, progress=False)
    assert no_hooks_left(model)

    def broken(*args, **kwargs):  # fails in the middle of a forward pass, with a replacement hook on
        raise RuntimeError("the MLP broke")

    model.blocks[1].mlp.forward = broken
    with pytest.raises(RuntimeError, match="the MLP broke"):
        intervene(model, tokens, mask, logit_diff(1, 2), means=means, progress=False)
    del model.blocks[1].mlp.forward
    assert no_hooks_left(model)
    with pytest.raises(GradGraphError, match="same length"):
        intervene(model, tokens, mask, logit_diff(1, 2), counterfactual=tokens[:, :2], progress=False)
    assert no_hooks_left(model)


def test_interventions_at_replaced_input_embeddings():
    """``embed`` runs the clean pass (and every intervention) at other input embeddings."""
    model = tiny_model("llama", dtype=torch.float64, n_layers=2, seed=5)
    tokens = torch.tensor([[3, 4, 5, 6], [7, 8, 9, 10]])
    mask = torch.ones_like(tokens)
    metric = logit_diff(torch.tensor([1, 2]), torch.tensor([3, 4]))
    means = activation_means(model, tokens, mask)
    plain = intervene(model, tokens, mask, metric, means=means, progress=False)
    same = intervene(model, tokens, mask, metric, means=means, embed=model.W_E[tokens], progress=False)
    assert all(torch.allclose(plain["mean_ablation"][k], same["mean_ablation"][k], atol=1e-12) for k in plain["mean_ablation"])
    embed = 0.5 * model.W_E[tokens]
    moved = intervene(model, tokens, mask, metric, means=means, embed=embed, progress=False)
    with hooks.replacing(model, {"hook_embed": embed}):
        clean = metric(model(tokens), mask)
        expected = _naive(model, tokens, mask, metric, "blocks.1.attn.hook_z", 2, means["blocks.1.attn.hook_z"][2]) - clean
    assert torch.allclose(moved["clean"]["metric"], clean, atol=1e-10)
    assert torch.allclose(moved["mean_ablation"]["L1H2"], expected, atol=1e-10)
    assert not torch.allclose(moved["clean"]["metric"], plain["clean"]["metric"])
    assert no_hooks_left(model)


def test_position_patching_equals_one_patch_at_a_time():
    from gradgraph.interventions import patch_positions

    model = tiny_model("llama", dtype=torch.float64, seed=4)
    tokens = torch.tensor([[3, 4, 5, 6], [8, 9, 10, 0]])
    counterfactual = torch.tensor([[3, 7, 5, 6], [8, 2, 10, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    metric = logit_diff(torch.tensor([1, 2]), torch.tensor([3, 4]))
    effects = patch_positions(model, tokens, mask, counterfactual, metric, progress=False)
    with torch.no_grad():
        base = metric(model(tokens), mask)
        with hooks.recording(model) as store:
            model(counterfactual)
        corrupt = hooks.node_firings(store)
        for site, layer, pos in (("resid_pre", 1, 1), ("attn_out", 0, 2), ("mlp_out", 1, 1), ("mlp_out", 0, 3)):
            name = names.name(site, layer)

            def one(act, name=name, pos=pos):
                act = act.clone()
                act[:, pos] = corrupt[name][:, pos]
                return act

            with hooks.replacing(model, {name: one}):
                expected = metric(model(tokens), mask) - base
            assert torch.allclose(effects[site][:, layer, pos], expected, atol=1e-10), (site, layer, pos)
    # patching an unchanged position does nothing; nor does the padding
    assert effects["resid_pre"][:, 0, 0].abs().max() < 1e-12 and effects["mlp_out"][1, :, 3].abs().max() < 1e-12
    assert no_hooks_left(model) and model.cfg.use_split_qkv_input and model.cfg.use_hook_mlp_in


def test_relevance_patching_with_gradient_rules_is_attribution_patching():
    from gradgraph.interventions import relevance_patching
    from gradgraph.rules import GRADIENT

    model = tiny_model("gpt2", dtype=torch.float64, seed=5)
    tokens, counterfactual = torch.tensor([[3, 4, 5, 6]]), torch.tensor([[3, 7, 5, 6]])
    mask = torch.ones_like(tokens)
    metric = logit_diff(1, 2)
    same = relevance_patching(model, tokens, mask, counterfactual, metric, rules=GRADIENT)
    for key, value in same["attribution"].items():
        assert torch.allclose(same["relp"][key], value), key
    relp = relevance_patching(model, tokens, mask, counterfactual, metric)
    assert set(relp["relp"]) == set(relp["attribution"]) >= {"L0H0", "MLP1", "resid_pre", "attn_out", "mlp_out"}
    assert relp["relp"]["mlp_out"].shape == (1, 2, 4)
    assert not torch.allclose(relp["relp"]["resid_pre"], relp["attribution"]["resid_pre"])


@pytest.mark.parametrize("case", [dict(arch="gpt2"), dict(arch="llama", n_heads=4, n_key_value_heads=2)],
                         ids=["gpt2", "llama-gqa"])
def test_pathway_interventions_from_the_weights_equal_hooks(case, monkeypatch):
    """Heads, MLPs and every head's q/k/v input: the runs from the weights (no hooks) equal
    TransformerLens' hooks (forced by a spec the weights path does not cover), and a q-input patch
    equals replacing that one copy."""
    from gradgraph.arch.spec import ModelSpec
    from gradgraph.interventions import PATHWAYS

    case = dict(case)
    model = tiny_model(case.pop("arch"), dtype=torch.float64, n_layers=2, seed=6, **case)
    tokens, mask, cf, metric = _clean_and_counterfactual()
    means = activation_means(model, tokens, mask)
    fast = intervene(model, tokens, mask, metric, counterfactual=cf, means=means, progress=False, kinds=PATHWAYS)
    with monkeypatch.context() as hooked:
        hooked.setattr(ModelSpec, "from_weights", property(lambda self: False))
        slow = intervene(model, tokens, mask, metric, counterfactual=cf, means=means, progress=False, kinds=PATHWAYS)
    G = model.cfg.n_key_value_heads or 4
    assert len(fast["patching"]) == 2 * (4 + G + G + 4 + 1) and set(fast["patching"]) == set(slow["patching"])
    for job in ("mean_ablation", "patching"):
        for label, effect in fast[job].items():
            assert torch.allclose(effect, slow[job][label], atol=1e-10), (job, label)
    with hooks.recording(model) as store:
        model(cf)
    corrupt = hooks.node_firings(store)
    clean = metric(model(tokens), mask)
    hook = names.name("q_input", 1)
    expected = _naive(model, tokens, mask, metric, hook, 2, corrupt[hook][:, :, 2]) - clean
    assert expected.abs().max() > 0 and torch.allclose(fast["patching"]["L1H2.q"], expected, atol=1e-10)
    assert no_hooks_left(model)
