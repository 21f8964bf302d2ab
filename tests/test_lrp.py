"""LRP rule sets: each equals a slow reference (autograd with detached and halved activations) in
float64, conserves where its rules promise it, runs under every semiring, and Mask-LRP's head mask
cuts what it should."""

import networkx as nx
import pytest
import torch

from gradgraph import GradGraphError, backprop, build_graph, path_entropy, tiny_model
from gradgraph.attribution import cuts, lrp
from gradgraph.graph import Matmul
from gradgraph.metrics import logit_diff
from gradgraph.rules import ATTN_LRP, CHEFER2021, CP_LRP, RELP, attn_lrp, epsilon_rule, relp, rule_set
from gradgraph.semirings import Max, Real
from gradgraph.weights import Weight

from conftest import no_hooks_left
from lrp_reference import chefer_relevance, reference_gradients
from test_graph import _all_paths, compare_with_autograd

METRIC = logit_diff(torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6]))


def _model_and_tokens(arch, seed=0, **cfg):
    model = tiny_model(arch, dtype=torch.float64, seed=seed, **cfg)
    tokens = torch.randint(0, model.cfg.d_vocab, (3, 6), generator=torch.Generator().manual_seed(seed))
    return model, tokens


def _input_relevance(graph, values) -> torch.Tensor:
    """Σ over input elements of activation ⊙ modified gradient, per item."""
    return sum((values[s][0] * graph.activations[s]).flatten(1).sum(1) for s in graph.sources)


@pytest.mark.parametrize("rules", ["attn-lrp", "cp-lrp", "relp", "relp+ah"])
@pytest.mark.parametrize("case", [dict(arch="gpt2"), dict(arch="llama"), dict(arch="llama", seed=1, n_heads=4,
                                                                              n_key_value_heads=2, n_layers=3)],
                         ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_rule_set_equals_reference(rules, case):
    case = dict(case)
    model, tokens = _model_and_tokens(case.pop("arch"), **case)
    graph = build_graph(model, tokens, METRIC, rules=rules)
    assert graph.rules == rules
    values = backprop(graph, Real)
    reference = reference_gradients(model, tokens, METRIC, rules)
    assert compare_with_autograd(graph, values, reference, 1e-10) > 15
    assert no_hooks_left(model)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_head_mask_equals_reference_and_its_extremes(arch):
    model, tokens = _model_and_tokens(arch, seed=2)
    mask = torch.rand(model.cfg.n_layers, model.cfg.n_heads, generator=torch.Generator().manual_seed(0)) > 0.5
    graph = build_graph(model, tokens, METRIC, rules=ATTN_LRP, head_mask=mask)
    values = backprop(graph, Real)
    assert compare_with_autograd(graph, values, reference_gradients(model, tokens, METRIC, "attn-lrp", mask), 1e-10)
    # a mask of all heads is unmasked LRP
    every = torch.ones_like(mask)
    full = backprop(build_graph(model, tokens, METRIC, rules=ATTN_LRP, head_mask=every), Real)
    plain = backprop(build_graph(model, tokens, METRIC, rules=ATTN_LRP), Real)
    assert torch.equal(full["hook_embed"], plain["hook_embed"])
    # a mask of none leaves only the skip and MLP routes: nothing reaches any q/k/v input
    none = backprop(build_graph(model, tokens, METRIC, rules=ATTN_LRP, head_mask=~every), Real)
    for layer in range(model.cfg.n_layers):
        for firing in "qkv":
            assert none[f"blocks.{layer}.hook_{firing}_input"].abs().max() == 0
    assert none["hook_embed"].abs().max() > 0


def _zero_biases(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.split(".")[-1].startswith("b"):
                p.zero_()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_conservation_where_the_rules_promise_it(arch):
    """With no biases, CP-LRP conserves at the input and at every residual cut (the norms, the
    activations and the pattern-held-constant heads are homogeneous maps); Chefer et al.'s
    normalised sums conserve with biases (α1β0 rescales each output's relevance)."""
    model, tokens = _model_and_tokens(arch, seed=3)
    _zero_biases(model)
    graph = build_graph(model, tokens, METRIC, rules=CP_LRP)
    values = backprop(graph, Real)
    assert torch.allclose(_input_relevance(graph, values), graph.metric_value, atol=1e-10, rtol=0)
    for layer in range(model.cfg.n_layers):
        cut = f"blocks.{layer}.hook_resid_post"
        total = (values[cut][0] * graph.activations[cut]).flatten(1).sum(1)
        assert torch.allclose(total, graph.metric_value, atol=1e-10, rtol=0), cut
    model, tokens = _model_and_tokens("llama", seed=4)
    graph = build_graph(model, tokens, METRIC, rules=CHEFER2021)
    assert torch.allclose(_input_relevance(graph, backprop(graph, Real)), graph.metric_value, atol=1e-9, rtol=0)


def test_attn_lrp_does_not_conserve_through_the_softmax():
    """AttnLRP's softmax rule (gradient × input) is not conservative: the delta is real, so it is reported."""
    model, tokens = _model_and_tokens("llama", seed=3)
    graph = build_graph(model, tokens, METRIC, rules=ATTN_LRP)
    delta = _input_relevance(graph, backprop(graph, Real)) - graph.metric_value
    assert delta.abs().max() > 1e-6


@pytest.mark.parametrize("rules", [ATTN_LRP, CHEFER2021])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_every_semiring_equals_path_enumeration_on_a_rule_graph(rules, arch):
    d_head = 1 if arch == "gpt2" else 2
    model = tiny_model(arch, n_layers=1, d_model=2, n_heads=1, d_head=d_head, d_mlp=2, d_vocab=8,
                       dtype=torch.float64, seed=3)
    graph = build_graph(model, torch.tensor([[1, 2]]), logit_diff(1, 3), rules=rules)
    scalar = graph.to_networkx()
    assert nx.is_directed_acyclic_graph(scalar)
    products = torch.tensor([w for w, _ in _all_paths(graph, scalar, 0)], dtype=torch.float64)
    assert len(products) > 5
    real = backprop(graph, Real)
    assert torch.isclose(sum(real[s][0].sum() for s in graph.sources), products.sum(), atol=1e-10)
    best = backprop(graph, Max)
    assert torch.isclose(max(best[s][0].max() for s in graph.sources), products.abs().max(), atol=1e-12)
    z, r = products.abs().sum(), torch.special.xlogy(products.abs(), products.abs()).sum()
    assert path_entropy(graph)[0].item() == pytest.approx((torch.log(z) - r / z).item(), rel=1e-10)


def test_epsilon_rule_and_lrp0_on_a_linear_map():
    """LRP-0 on a linear map is gradient × input (the same block); LRP-ε rescales each output by
    y / (y + ε sign y)."""
    W = torch.randn(1, 4, 3, dtype=torch.float64)
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    y = x @ W[0] + 0.3
    block = Matmul("x", "y", "linear", 0, Weight(W), True, "b p d -> 1 (b p) d", "b p m -> 1 (b p) m", dict(b=2, p=5))
    assert epsilon_rule(0.0)(block, x, y) == [block]
    g = torch.randn(1, 2, 5, 3, dtype=torch.float64)
    (scaled,) = epsilon_rule(0.25)(block, x, y)
    expected = (g[0] * y / (y + 0.25 * torch.sign(y))) @ W[0].T
    assert torch.allclose(scaled.backward(Real, g)[0], expected, atol=1e-12)
    assert attn_lrp(0.25).name == "attn-lrp(eps=0.25)"


def test_one_recording_two_rule_sets_and_names():
    from gradgraph.build import assemble, record

    model, tokens = _model_and_tokens("gpt2", seed=5)
    recording = record(model, tokens, METRIC)
    lrp = backprop(assemble(recording, ATTN_LRP), Real)["hook_embed"]
    again = backprop(build_graph(model, tokens, METRIC, rules="attn-lrp"), Real)["hook_embed"]
    assert torch.equal(lrp, again)
    assert rule_set("relp") is RELP and relp(True).name == "relp+ah"
    with pytest.raises(GradGraphError, match="unknown rule set"):
        build_graph(model, tokens, METRIC, rules="lrp-magic")
    for bad in (torch.ones(2, 4), torch.ones(model.cfg.n_layers, model.cfg.n_heads, dtype=torch.bool)[:, :2], [[1]]):
        with pytest.raises(GradGraphError, match="head_mask"):
            build_graph(model, tokens, METRIC, rules=ATTN_LRP, head_mask=bad)
    assert no_hooks_left(model)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_chefer2021_equals_relevance_space_reference(arch):
    model, tokens = _model_and_tokens(arch, seed=6)
    graph = build_graph(model, tokens, METRIC, rules=CHEFER2021)
    values = backprop(graph, Real)
    ours = values["hook_embed"][0] * graph.activations["hook_embed"]
    reference = chefer_relevance(model, tokens, METRIC)
    assert torch.allclose(ours, reference, atol=1e-10, rtol=0), (ours - reference).abs().max()
    settled = backprop(graph, Real, keep=["hook_embed", "blocks.0.attn.hook_pattern"])  # kept from fixing the graph
    for node, value in settled.items():  # that pass went through each norm on per-head copies once: the order of sums
        assert torch.allclose(value, values[node], rtol=1e-12, atol=1e-14)
    assert no_hooks_left(model)


def test_reassembling_one_recording_under_other_masks_equals_fresh_graphs():
    from gradgraph.build import assemble, record

    model, tokens = _model_and_tokens("llama", seed=7)
    recording = record(model, tokens, METRIC)
    masks = [torch.rand(model.cfg.n_layers, model.cfg.n_heads, generator=torch.Generator().manual_seed(i)) > 0.5
             for i in range(2)]
    for rules in (CHEFER2021, ATTN_LRP):
        first = assemble(recording, rules, head_mask=masks[0])
        again = backprop(assemble(recording, rules, head_mask=masks[1]), Real)["hook_embed"]
        fresh = backprop(build_graph(model, tokens, METRIC, rules=rules, head_mask=masks[1]), Real)["hook_embed"]
        assert torch.allclose(again, fresh, atol=1e-12, rtol=0)
        assert not torch.allclose(backprop(first, Real)["hook_embed"], fresh)  # the masks differ, and so do results


def test_lrp_returns_an_attribution_with_its_errors():
    model, tokens = _model_and_tokens("llama", seed=7)
    result = lrp(model, tokens, METRIC, rules=CP_LRP, keep="all")
    assert result.method == "cp-lrp" and result.scores.shape == tokens.shape
    graph = result.graph
    assert torch.allclose(result.delta, result.scores.sum(1) - graph.metric_value)
    assert torch.allclose(result.values["hook_embed"].sum(-1), result.scores)
    assert set(result.cut_deltas) == set(cuts(graph)) and len(result.cut_deltas) == 2 * model.cfg.n_layers + 1
    # no biases in the tiny Llama and the pattern held constant: CP-LRP conserves at every cut
    assert max(d.abs().max().item() for d in result.cut_deltas.values()) < 1e-10
    rows = result.by_component(kinds=("head", "mlp"))
    heads = [r for r in rows if r["kind"] == "head" and r["batch"] == 0]
    assert len(heads) == model.cfg.n_layers * model.cfg.n_heads * tokens.shape[1]
    z = result.values["blocks.1.attn.hook_z"]  # head relevance = Σ of its output's elements
    assert [r["value"] for r in heads if (r["layer"], r["head"], r["position"]) == (1, 3, 4)] == \
        pytest.approx([z[0, 4, 3].sum().item()])
    masked = lrp(model, tokens, METRIC, head_mask=torch.zeros(2, 4, dtype=torch.bool))
    assert masked.method == "attn-lrp+mask(0 heads)"


@pytest.mark.real
def test_attn_lrp_and_cp_lrp_equal_the_reference_implementation(smol_model):
    """lxt 2.1 (AttnLRP's published code) on the Hugging Face model from the same GGUF file."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("lxt")
    texts = ["The keys to the cabinet", "The author that the guards like"]
    for rules in ("attn-lrp", "cp-lrp"):
        run = subprocess.run([sys.executable, str(Path(__file__).parent / "lxt_reference.py"), rules, " are", " is",
                              *texts], capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-2000:]
        for text, ref in zip(texts, json.loads(run.stdout)):
            tokens = torch.tensor([ref["tokens"]])
            ours = lrp(smol_model, tokens, logit_diff(" are", " is"), rules=rules)
            assert ours.target.item() == pytest.approx(ref["metric"], rel=1e-4)
            expected = torch.tensor(ref["relevance"])
            err = (ours.scores[0] - expected).abs().max() / expected.abs().max()
            assert err < 1e-3, (rules, text, ours.scores[0].tolist(), ref["relevance"])


def test_explanation_maps_on_a_tiny_model():
    from gradgraph.attribution import attention_rollout, chefer_rollout, mask_lrp, partial_lrp, raw_attention
    from gradgraph.build import assemble, record

    model, tokens = _model_and_tokens("gpt2", seed=8)
    recording = record(model, tokens, METRIC)
    gradient, chefer = assemble(recording), assemble(recording, CHEFER2021)
    raw = raw_attention(gradient)
    pattern = gradient.activations["blocks.1.attn.hook_pattern"]
    assert torch.allclose(raw.scores, pattern[:, :, -1].mean(1))
    rollout = attention_rollout(gradient)
    assert torch.allclose(rollout.scores.sum(1), torch.ones(3, dtype=torch.float64))  # rows stay distributions
    one_layer = torch.eye(6, dtype=torch.float64) + gradient.activations["blocks.0.attn.hook_pattern"].mean(1)
    two = (torch.eye(6, dtype=torch.float64) + pattern.mean(1)) / 2 @ (one_layer / 2)
    assert torch.allclose(rollout.scores, two[:, -1])
    rolled = chefer_rollout(gradient, chefer)
    assert (rolled.scores >= 0).all() and (rolled.scores[:, -1] == 0).all()
    # Mask-LRP with every head equals Chefer's own map; with none, no head's relevance enters it
    every = mask_lrp(model, tokens, METRIC, head_mask=torch.ones(2, 4, dtype=torch.bool))
    assert torch.allclose(every.scores, rolled.scores)
    none = mask_lrp(model, tokens, METRIC, head_mask=torch.zeros(2, 4, dtype=torch.bool))
    assert torch.equal(none.scores, torch.zeros_like(none.scores))
    assert partial_lrp(chefer).scores.shape == tokens.shape


def test_component_views_on_lrp_graphs():
    """The component graph reads relevance flow the same way; CP-LRP's constant pattern leaves the
    q and k pathways without flow, and Chefer's rescaled residual sums are refused by name."""
    from gradgraph.branches import branch_shares
    from gradgraph.component_graph import component_graph

    model, tokens = _model_and_tokens("llama", seed=9)
    for rules in (ATTN_LRP, CP_LRP, RELP):
        graph = build_graph(model, tokens[:1], logit_diff(1, 4), rules=rules)
        flows = component_graph(graph)
        qk = [w for u, v, w in flows.edges(data="weight") if ".q@" in u or ".k@" in u]
        assert (not qk) if rules is CP_LRP else qk
        shares = branch_shares(graph, -1)
        assert shares.value.shape == (model.cfg.n_layers, 4)
        if rules is CP_LRP:  # nothing reaches q or k
            assert (shares.value[:, :2] == 0).all() and (shares.value[:, 2:] > 0).any()
    with pytest.raises(GradGraphError, match="chefer2021"):
        component_graph(build_graph(model, tokens[:1], logit_diff(1, 4), rules=CHEFER2021))
