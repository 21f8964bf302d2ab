"""EAP's edge graph and edge scores: the graph follows each family's layout, and EAP's score of every
edge is minus the derivative of the metric when that edge alone moves to its counterfactual
(what patching the edge costs, to first order), computed here by autograd through TransformerLens'
own forward."""

import pytest
import torch

from gradgraph import GradGraphError
from gradgraph.arch import names
from gradgraph.arch.models import FAMILIES
from gradgraph.edge_methods import _outputs, _recorded, eap, edge_scores
from gradgraph.edges import LOGITS, edge_graph
from gradgraph.metrics import prepare

from conftest import no_hooks_left
from test_families import family_model, prompts

ADDITIVE = [f for f in FAMILIES if f not in ("bert", "gemma2", "olmo2")]  # post-norm: no edges


def _counterfactual(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    other = tokens.clone()
    other[:, 1] = (tokens[:, 1] + 7) % 40 + 1
    return other * mask


def _patched_derivatives(model, tokens, mask, metric, delta, graph_of):
    """``[batch, upstream, downstream]``: ∂m/∂t_u at t = 0 with ``t_u · Δ_u`` added to one downstream
    node's input at a time (every upstream node with an edge into it at once), by autograd."""
    reg = graph_of.registry
    prepared = prepare(metric, model)
    B, U, D = tokens.shape[0], len(graph_of.upstream), len(graph_of.downstream)
    out = torch.zeros(B, U, D, dtype=torch.float64)
    targets = []
    for layer in range(reg.n_layers):
        for kind in ("q", "k", "v"):
            targets += [(names.name(f"{kind}_input", layer), h) for h in range(reg.copies(kind))]
        if reg.mlps:
            targets.append((names.name("mlp_in", layer), None))
    targets.append((names.name("resid_post", reg.n_layers - 1), None))
    for d, (hook, head) in enumerate(targets):
        t = torch.zeros(B, U, dtype=torch.float64, requires_grad=True)
        into = graph_of.adjacency[:, d].to(torch.float64)

        def add(x, hook=None, head=head):
            shift = torch.einsum("bu,bpun->bpn", t * into, delta)
            if head is None:
                return x + shift
            x = x.clone()
            x[:, :, head] = x[:, :, head] + shift
            return x

        logits = model.run_with_hooks(tokens, fwd_hooks=[(hook, add)])
        prepared(logits, mask).sum().backward()
        out[:, :, d] = t.grad
    return out


@pytest.mark.parametrize("family", ADDITIVE)
def test_eap_is_the_first_order_effect_of_patching_each_edge(family):
    from gradgraph.build import build_graph

    model = family_model(family, n_layers=2, seed=4)
    tokens, mask, metric = prompts(family)
    other = _counterfactual(tokens, mask)
    scores = eap(model, tokens, other, metric, attention_mask=mask)
    graph_of = scores.graph
    graph = build_graph(model, tokens, metric, attention_mask=mask)
    reg = graph_of.registry
    delta = _outputs(model, _recorded(model, other, metric, mask), reg) - _outputs(model, graph.activations, reg)
    expected = -_patched_derivatives(model, tokens, mask, metric, delta, graph_of)
    assert expected.abs().max() > 1e-3 and (expected[:, ~graph_of.adjacency] == 0).all()
    torch.testing.assert_close(scores.scores, expected, rtol=1e-9, atol=1e-12)
    assert no_hooks_left(model)


def test_the_graph_follows_each_layout():
    L, H = 2, 4
    gpt2 = edge_graph(family_model("gpt2", n_layers=L))
    assert gpt2.upstream[:3] == ("embed", "L0H0", "L0H1") and gpt2.downstream[-1] == LOGITS
    assert len(gpt2.upstream) == 1 + L * (H + 1) and len(gpt2.downstream) == L * (3 * H + 1) + 1
    per_layer = 3 * H + 1
    # embed reaches all; a layer-0 head reaches MLP0, layer 1 and the logits; MLP0 layer 1 and the logits
    assert len(gpt2) == (2 * per_layer + 1) + H * (1 + per_layer + 1) + (per_layer + 1) + H * 2 + 1
    assert "L0H2->MLP0" in gpt2.edges and "L1H0->L1H0.q" not in gpt2.edges and "MLP1->logits" in gpt2.edges
    pythia = edge_graph(family_model("pythia", n_layers=L))  # parallel: a layer's MLP reads its input
    assert "L0H2->MLP0" not in pythia.edges and "L0H2->MLP1" in pythia.edges and len(pythia) == len(gpt2) - H * L
    llama = edge_graph(family_model("llama", n_layers=L, n_key_value_heads=2))
    assert "L0H0->L1H2-3.k" in llama.edges and "L1H1.q" in llama.downstream and "L1H1.k" not in llama.downstream
    attn_only = edge_graph(family_model("attn-only", n_layers=L))
    assert not any(label.startswith("MLP") for label in attn_only.upstream + attn_only.downstream)
    assert attn_only.index("L0H1->L1H3.v") == (2, attn_only.downstream.index("L1H3.v"))


@pytest.mark.parametrize("family", ["llama", "pythia"])  # the fused pass, the graph
def test_eap_ig_of_one_point_is_eap_and_of_more_is_their_mean(monkeypatch, family):
    model = family_model(family, n_layers=2, seed=2, **(dict(n_key_value_heads=2) if family == "llama" else {}))
    tokens, mask, metric = prompts(family)
    other = _counterfactual(tokens, mask)
    one = eap(model, tokens, other, metric, attention_mask=mask)
    assert one.method == "eap"
    torch.testing.assert_close(eap(model, tokens, other, metric, attention_mask=mask, steps=1).scores, one.scores)
    three = eap(model, tokens, other, metric, attention_mask=mask, steps=3)
    assert three.method == "eap-ig (3)" and not torch.allclose(three.scores, one.scores)
    # the mean over the points of EAP with the gradient taken at each point (a model fed those embeddings)
    from gradgraph.build import build_graph
    from gradgraph.edge_methods import _gradients

    graph = build_graph(model, tokens, metric, attention_mask=mask)
    reg = one.graph.registry
    cf = _recorded(model, other, metric, mask, embeddings=True)
    e, e_cf = graph.activations[names.name("embed")], cf[names.name("embed")]
    delta = _outputs(model, graph.activations, reg) - _outputs(model, cf, reg)
    per_point = []
    for k in (1, 2, 3):
        point = build_graph(model, tokens, metric, attention_mask=mask, embed=e_cf + k / 3 * (e - e_cf))
        per_point.append(torch.einsum("bpud,bpnd->bun", delta, _gradients(point, reg)) * one.graph.adjacency)
    torch.testing.assert_close(three.scores, sum(per_point) / 3, rtol=1e-9, atol=1e-12)
    import gradgraph.edge_methods

    monkeypatch.setattr(gradgraph.edge_methods, "_ROWS", 4)  # one point per graph: the same mean
    torch.testing.assert_close(eap(model, tokens, other, metric, attention_mask=mask, steps=3).scores, three.scores,
                               rtol=1e-12, atol=1e-14)
    assert three.table()["embed->logits"] == pytest.approx(float(three.of("embed->logits").sum()))


def test_bad_inputs_are_named():
    model = family_model("gpt2", n_layers=2)
    tokens, mask, metric = prompts("gpt2")
    with pytest.raises(GradGraphError, match="align"):
        eap(model, tokens, tokens[:, :5], metric)
    with pytest.raises(GradGraphError, match="steps"):
        eap(model, tokens, tokens, metric, steps=0)
    with pytest.raises(GradGraphError, match="counterfactual"):
        edge_scores(model, tokens, metric, method="relp")
    with pytest.raises(GradGraphError, match="method must be one of"):
        edge_scores(model, tokens, metric, tokens, method="acdc")
    graph = edge_graph(model)
    with pytest.raises(GradGraphError, match="not an edge label"):
        graph.index("L0H9->logits")
    with pytest.raises(GradGraphError, match="after"):
        graph.index("MLP1->L0H0.q")
    with pytest.raises(GradGraphError, match="decoders"):
        edge_graph(family_model("bert", n_layers=1))
    for family in ("gemma2", "olmo2"):
        with pytest.raises(GradGraphError, match="norms after"):
            edge_graph(family_model(family, n_layers=1))
    assert no_hooks_left(model)


def _residuals(model, tokens, graph_of):
    """The residual at every downstream input ``[batch, pos, downstream, d_model]`` on TransformerLens'
    own forward, and per downstream node the attention output biases written before it."""
    from gradgraph.arch import hooks

    reg = graph_of.registry
    wanted = {names.name("resid_post", reg.n_layers - 1)}
    for layer in range(reg.n_layers):
        wanted |= {names.name(f"{k}_input", layer) for k in "qkv"} | ({names.name("mlp_in", layer)} if reg.mlps else set())
    with hooks.recording(model, names=wanted) as store:
        model(tokens)
    rows, biases = [], []
    for layer in range(reg.n_layers):
        before = sum((model.blocks[l].attn.b_O.detach() for l in range(layer)), torch.zeros(model.cfg.d_model, dtype=torch.float64))
        for kind in "qkv":
            x = store[names.name(f"{kind}_input", layer)][0]
            rows += [x[:, :, h] for h in range(x.shape[2])]
            biases += [before] * x.shape[2]
        if reg.mlps:
            rows.append(store[names.name("mlp_in", layer)][0])
            biases.append(before + (model.blocks[layer].attn.b_O.detach() if reg.sequential else 0))
    rows.append(store[names.name("resid_post", reg.n_layers - 1)][0])
    biases.append(sum((model.blocks[l].attn.b_O.detach() for l in range(reg.n_layers)), torch.zeros(model.cfg.d_model, dtype=torch.float64)))
    return torch.stack(rows, 2), torch.stack(biases)


@pytest.mark.parametrize("family", ["gpt2", "llama", "pythia"])
def test_relevance_and_relp_split_each_input_over_its_edges(family):
    """Summed over the edges into a downstream node: AttnLRP's scores are the relevance of its input
    (``r_d · ∂̃m/∂r_d``, less the attention biases, which no edge carries), RelP's the first-order
    effect of its input's counterfactual change (``(r_d(x) − r_d(x′)) · ∂̃m/∂r_d``)."""
    from gradgraph.build import build_graph
    from gradgraph.edge_methods import _gradients

    kw = dict(n_key_value_heads=2) if family == "llama" else {}
    model = family_model(family, n_layers=2, seed=6, **kw)
    tokens, mask, metric = prompts(family)
    other = _counterfactual(tokens, mask)
    graph_of = edge_graph(model)
    r, bias = _residuals(model, tokens, graph_of)
    r_cf, _ = _residuals(model, other, graph_of)
    lrp_grad = _gradients(build_graph(model, tokens, metric, attention_mask=mask, rules="attn-lrp"), graph_of.registry)
    relp_grad = _gradients(build_graph(model, tokens, metric, attention_mask=mask, rules="relp"), graph_of.registry)
    relevance = edge_scores(model, tokens, metric, method="attn-lrp", attention_mask=mask).scores.sum(1)
    torch.testing.assert_close(relevance, ((r - bias) * lrp_grad).sum((1, 3)), rtol=1e-9, atol=1e-12)
    relp = edge_scores(model, tokens, metric, other, method="relp", attention_mask=mask).scores.sum(1)
    torch.testing.assert_close(relp, ((r - r_cf) * relp_grad).sum((1, 3)), rtol=1e-9, atol=1e-12)
    assert not torch.allclose(relp, ((r - r_cf) * _gradients(build_graph(model, tokens, metric, attention_mask=mask),
                                                          graph_of.registry)).sum((1, 3)))
    assert no_hooks_left(model)


@pytest.mark.parametrize("family", ["gpt2", "llama", "pythia", "attn-only"])
def test_every_path_enters_the_logits_by_one_edge(family):
    """Each input → metric path reaches the last residual through exactly one edge into ``logits``:
    over those edges, ``flow`` sums to the Abs path sum from the inputs and ``max`` peaks at Max's."""
    from gradgraph import backprop, build_graph
    from gradgraph.semirings import Abs, Max

    model = family_model(family, n_layers=2, seed=8)
    tokens, mask, metric = prompts(family)
    graph = build_graph(model, tokens, metric, attention_mask=mask)
    real = graph.source_mask.reshape(graph.source_mask.shape + (1,))
    flow = edge_scores(model, tokens, metric, method="flow", attention_mask=mask)
    into_logits = flow.scores[:, :, -1]
    total = sum((backprop(graph, Abs, dtype=torch.float64, keep=[s])[s][0] * real).sum((1, 2)) for s in graph.sources)
    torch.testing.assert_close(into_logits.sum(1), total, rtol=1e-9, atol=0)
    best = edge_scores(model, tokens, metric, method="max", attention_mask=mask).scores[:, :, -1].amax(1)
    peak = torch.stack([(backprop(graph, Max, keep=[s])[s][0] * real).flatten(1).amax(1) for s in graph.sources]).amax(0)
    torch.testing.assert_close(best, peak, rtol=1e-12, atol=0)
    assert (flow.scores >= 0).all() and (flow.scores[:, ~flow.graph.adjacency] == 0).all()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_the_fused_pass_gives_the_graphs_gradient_at_every_downstream_input(family):
    """``fused.reader_values`` (one autograd pass, then each norm's product for every head at once)
    equals the graph's Real values at every head's q/k/v input, every MLP input and the last residual,
    under the gradient, RelP and AttnLRP, padding included; and the activations the edges read."""
    from gradgraph import fused
    from gradgraph.build import build_graph
    from gradgraph.edge_methods import _reader_grads

    model = family_model(family, n_layers=2, seed=3, **(dict(n_key_value_heads=2) if family == "llama" else {}))
    tokens, mask, metric = prompts(family)
    reg = edge_graph(model).registry
    for rules in ("gradient", "relp", "attn-lrp"):
        assert fused.covers(model, rules)
        graph = build_graph(model, tokens, metric, attention_mask=mask, rules=rules)
        values = fused.reader_values(model, tokens, metric, rules=rules, attention_mask=mask)
        expected = _reader_grads(graph, reg)
        assert set(values.grads) == set(expected) and len(expected) == 4 * 2 + 1
        for name, g in expected.items():
            torch.testing.assert_close(values.grads[name], g, rtol=0, atol=1e-12)
        for name, a in values.activations.items():
            torch.testing.assert_close(a, graph.activations[name], rtol=0, atol=1e-12)
    assert no_hooks_left(model)


@pytest.mark.parametrize("method", ["eap", "flow"])
def test_scores_in_batches_are_the_scores_of_the_whole(method):
    model = family_model("llama", n_layers=2, n_key_value_heads=2, seed=4)
    tokens, mask, metric = prompts("llama")
    other = _counterfactual(tokens, mask)
    whole = edge_scores(model, tokens, metric, other, method=method, attention_mask=mask)
    parts = edge_scores(model, tokens, metric, other, method=method, attention_mask=mask, batch_size=2)
    torch.testing.assert_close(parts.scores, whole.scores, rtol=1e-10, atol=1e-12)
    with pytest.raises(GradGraphError, match="batch_size"):
        edge_scores(model, tokens, metric, other, method=method, attention_mask=mask, batch_size=0)
