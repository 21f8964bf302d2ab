"""Every model family the graph builder covers: Real backprop equals autograd at every hook point
(float64, padded batches), the family's own ops are in the graph, conserving rule sets conserve,
the component views follow the layout, and what is still refused is named."""

import pytest
import torch

from gradgraph import GradGraphError, backprop, build_graph, lrp, tiny_model
from gradgraph.arch import hooks, names
from gradgraph.branches import branch_shares
from gradgraph.labels import Registry
from gradgraph.metrics import logprob_diff, mask_positions, masked_logit_diff
from gradgraph.arch.models import FAMILIES
from gradgraph.semirings import Abs, Real

from conftest import no_hooks_left
from test_graph import compare_with_autograd

MASK_ID = 49  # the tiny encoder's [MASK]

# small soft caps and a window shorter than the prompt, so that Gemma 2's ops are far from identities
OVERRIDES = {"gemma2": dict(attn_scores_soft_cap=0.5, output_logits_soft_cap=0.3, window_size=3)}

# nodes that exist only if the family's own op was built (and ones that must not exist)
PRESENT = {
    "pythia": ["blocks.0.hook_mlp_in"], "gptj": ["blocks.0.hook_mlp_in"], "phi": ["blocks.0.hook_mlp_in"],
    "gemma2": ["blocks.0.attn.scores_raw", "blocks.0.ln1_post.hook_scale", "blocks.1.ln2_post.hook_normalized",
               "unembed.soft_capped"],
    "qwen3": ["blocks.0.attn.q_norm.hook_scale", "blocks.1.attn.k_normed"],
    "olmo2": ["blocks.0.attn.q_norm.hook_normalized", "blocks.0.ln1.hook_scale", "blocks.0.attn.out"],
    "solu": ["blocks.0.mlp.softmax", "blocks.0.mlp.hook_mid", "blocks.0.mlp.ln.hook_scale"],
    "bert": ["embed.hook_token_type_embed", "embed.ln.hook_scale", "blocks.0.ln1.output",
             "blocks.0.hook_normalized_resid_post", "mlm_head.dense", "mlm_head.ln.hook_normalized"],
}
ABSENT = {
    "pythia": ["blocks.0.hook_resid_mid"], "gptj": ["blocks.0.hook_resid_mid"], "phi": ["blocks.0.hook_resid_mid"],
    "olmo2": ["blocks.0.ln1.hook_scale:q"],
    "attn-only": ["blocks.0.hook_mlp_out", "blocks.0.hook_resid_mid"],
    "no-norm": ["blocks.0.ln1.hook_scale:q", "ln_final.hook_scale"],
    "bert": ["blocks.0.ln1.hook_scale:q"],
}


def family_model(family: str, **cfg):
    return tiny_model(family, dtype=torch.float64, d_head=8, d_model=32, n_heads=4, **{**OVERRIDES.get(family, {}), **cfg})


def prompts(family: str):
    """Right-padded tokens, their mask and a metric: the next token's log-odds for decoders, the
    log-odds at a [MASK] for the encoder."""
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randint(1, MASK_ID, (3, 7), generator=generator)
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [1] * 4 + [0] * 3])
    tokens = tokens * mask
    good, bad = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])
    if FAMILIES[family].get("encoder"):
        tokens[0, 4], tokens[1, 1], tokens[2, 3] = MASK_ID, MASK_ID, MASK_ID
        return tokens, mask, logprob_diff(good, bad, pos=mask_positions(None, tokens, MASK_ID))
    return tokens, mask, logprob_diff(good, bad)


def autograd_reference(model, tokens, mask, metric) -> dict[str, torch.Tensor]:
    run = dict(one_zero_attention_mask=mask) if names.is_encoder(model.cfg) else {}
    with hooks.recording(model, keep_grad=True) as store:
        logits = model(tokens, **run)
    metric(logits, mask).sum().backward()
    model.zero_grad(set_to_none=True)
    return {name: t.grad for name, t in hooks.node_firings(store).items() if t.grad is not None}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_real_equals_autograd_at_every_hook_point(family):
    model = family_model(family, n_layers=3, seed=11)
    tokens, mask, metric = prompts(family)
    graph = build_graph(model, tokens, metric, attention_mask=mask)
    reference = autograd_reference(model, tokens, mask, metric)
    assert compare_with_autograd(graph, backprop(graph, Real), reference, 1e-10) > 40
    assert all(node in graph.shapes for node in PRESENT.get(family, [])), family
    assert not any(node in graph.shapes for node in ABSENT.get(family, [])), family
    assert no_hooks_left(model)


@pytest.mark.parametrize("family", ["llama", "gemma", "gemma2", "qwen3", "olmo2"])
@pytest.mark.parametrize("rules", ["cp-lrp", "chefer2021"])
def test_rule_sets_conserve_on_bias_free_families(family, rules):
    """CP-LRP and Chefer's rules conserve relevance exactly in a model without biases: the new ops
    (q/k norms, norms after attention and MLP, soft caps, local attention) must too."""
    model = family_model(family, n_layers=2, seed=2)
    tokens, mask, metric = prompts(family)
    result = lrp(model, tokens, metric, rules=rules, attention_mask=mask)
    assert (result.delta.abs() <= 1e-10 * result.target.abs().clamp(min=1)).all(), result.delta


def test_attention_only_and_parallel_layouts_in_the_component_views():
    attn_only = family_model("attn-only", n_layers=2, seed=1)
    reg = Registry.of(attn_only)
    assert not any(c.kind == "mlp" for c in reg.components())
    with pytest.raises(GradGraphError, match="attention only"):
        reg.parse("MLP0")
    pythia = family_model("pythia", n_layers=2, seed=1)
    tokens, mask, metric = prompts("pythia")
    graph = build_graph(pythia, tokens, metric, attention_mask=mask)
    assert Registry.of(graph).branch_nodes(1)["skip"] == "blocks.1.hook_resid_post"
    # the skip of a parallel block is the weight-1 residual edge resid_pre -> resid_post: its summed
    # Abs flow is what arrives at resid_post, at the last real position, averaged over items
    shares = branch_shares(graph, -1, semiring=Abs, agg="sum")
    flows = backprop(graph, Abs)["blocks.1.hook_resid_post"][0]
    last = mask.sum(1) - 1
    expected = sum(flows[b, last[b]].sum() for b in range(3)) / 3
    assert shares.value[1, 3].item() == pytest.approx(expected.item(), rel=1e-12)


def test_branch_shares_and_component_views_on_the_encoder():
    """BERT's q/k/v inputs read hook_resid_pre straight (no norm before attention) and its skip is
    hook_resid_mid: the branch shares at the [MASK] are the Abs flows at those nodes."""
    from gradgraph.components import component_values

    model = family_model("bert", n_layers=2, seed=5)
    tokens, mask, metric = prompts("bert")
    graph = build_graph(model, tokens, metric, attention_mask=mask)
    at = mask_positions(model, tokens, MASK_ID)
    shares = branch_shares(graph, at, semiring=Abs, agg="sum")
    flows = backprop(graph, Abs)
    rows = torch.arange(3)
    for layer in range(2):
        for column, node in enumerate(["q_input", "k_input", "v_input", "resid_mid"]):
            value = flows[names.name(node, layer)][0][rows, at].sum() / 3
            assert shares.value[layer, column].item() == pytest.approx(value.item(), rel=1e-12)
    values = component_values(graph, backprop(graph, Real), Real)
    assert {row["kind"] for row in values} == {"embed", "q", "k", "v", "head", "mlp"}


def test_masked_metric_reads_the_mask_position():
    model = family_model("bert", n_layers=1, seed=4)
    tokens, mask, _ = prompts("bert")
    metric = masked_logit_diff(model, tokens, 1, 2, mask_token_id=MASK_ID)
    graph = build_graph(model, tokens, metric, attention_mask=mask)
    logits = model(tokens, one_zero_attention_mask=mask)
    at = mask_positions(model, tokens, MASK_ID)
    expected = logits[torch.arange(3), at, 1] - logits[torch.arange(3), at, 2]
    assert torch.allclose(graph.metric_value, expected, atol=1e-12)


def test_bad_inputs_name_the_problem():
    decoder = tiny_model("gpt2")
    tokens = torch.randint(1, 40, (1, 5))
    with pytest.raises(GradGraphError, match="no \\[MASK\\] token"):
        masked_logit_diff(decoder, tokens, 1, 2)
    encoder = family_model("bert", n_layers=1, seed=4)
    with pytest.raises(GradGraphError, match="exactly one per row"):
        masked_logit_diff(encoder, tokens, 1, 2, mask_token_id=MASK_ID)
    tokens[0, 2] = MASK_ID
    metric = masked_logit_diff(encoder, tokens, 1, 2, mask_token_id=MASK_ID)
    with pytest.raises(GradGraphError, match="causal"):  # a cached prefix is a causal-only option
        build_graph(encoder, tokens, metric, prefix=torch.tensor([1, 2]))
    from gradgraph.interventions import intervene

    with pytest.raises(GradGraphError, match="HookedEncoder"):
        intervene(encoder, tokens, torch.ones_like(tokens), metric, counterfactual=tokens)
    assert no_hooks_left(encoder)
    for overrides, feature in [
        (dict(positional_embedding_type="alibi"), "alibi"),
        (dict(use_attention_sinks=True), "attention sinks"),
        (dict(attention_dir="bidirectional"), "bidirectional attention in a HookedTransformer"),
    ]:
        model = tiny_model("llama", **overrides)
        with pytest.raises(GradGraphError, match=feature):
            build_graph(model, torch.randint(0, 40, (1, 4)), lambda logits: logits[:, -1, 0])
        assert no_hooks_left(model)


@pytest.mark.parametrize("family", ["bert", "gemma2", "pythia"])
def test_integrated_gradients_are_complete(family):
    """IG through each family's graph (the token embeddings replaced along the path: the encoder's
    embed.hook_embed too) sums to F(x) − F(baseline), the baseline every position at token 0."""
    from gradgraph import attribute

    model = family_model(family, n_layers=2, seed=6)
    tokens, mask, metric = prompts(family)
    result = attribute(model, tokens[:1], logprob_diff(1, 4, pos=int(mask_positions(None, tokens[:1], MASK_ID))
                                                       if family == "bert" else -1),
                       method="ig", steps=48, baseline=0)  # from token 0: no zero vector into a norm
    assert abs(float(result.delta[0])) < 1e-4 * max(1.0, abs(float(result.target[0])))
    assert result.values[names.inputs(model)[0]].shape == (1, 7, model.cfg.d_model)
