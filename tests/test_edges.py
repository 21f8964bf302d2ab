"""EAP's edge graph and edge scores: the graph follows each family's layout, and EAP's score of every
edge is the derivative of the metric when that edge alone carries its counterfactual (patching the
edge, to first order), computed here by autograd through TransformerLens' own forward."""

import pytest
import torch

from gradgraph import GradGraphError, tiny_model
from gradgraph.arch import names
from gradgraph.arch.models import FAMILIES
from gradgraph.edges import LOGITS, eap, edge_graph
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
    from gradgraph.edges import _corrupt_activations, _outputs
    from gradgraph.build import build_graph

    model = family_model(family, n_layers=2, seed=4)
    tokens, mask, metric = prompts(family)
    other = _counterfactual(tokens, mask)
    scores = eap(model, tokens, other, metric, attention_mask=mask)
    graph_of = scores.graph
    graph = build_graph(model, tokens, metric, attention_mask=mask)
    reg = graph_of.registry
    delta = _outputs(model, _corrupt_activations(model, other, reg), reg) - _outputs(model, graph.activations, reg)
    expected = _patched_derivatives(model, tokens, mask, metric, delta, graph_of)
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


def test_eap_ig_of_one_point_is_eap_and_of_more_is_their_mean():
    model = family_model("llama", n_layers=2, n_key_value_heads=2, seed=2)
    tokens, mask, metric = prompts("llama")
    other = _counterfactual(tokens, mask)
    one = eap(model, tokens, other, metric, attention_mask=mask)
    assert one.method == "EAP"
    torch.testing.assert_close(eap(model, tokens, other, metric, attention_mask=mask, steps=1).scores, one.scores)
    three = eap(model, tokens, other, metric, attention_mask=mask, steps=3)
    assert three.method == "EAP-IG (3)" and not torch.allclose(three.scores, one.scores)
    # the mean over the points of EAP with the gradient taken at each point (a model fed those embeddings)
    from gradgraph.build import build_graph
    from gradgraph.edges import _gradients, _outputs, _corrupt_activations

    graph = build_graph(model, tokens, metric, attention_mask=mask)
    reg = one.graph.registry
    cf = _corrupt_activations(model, other, reg)
    e, e_cf = graph.activations[names.name("embed")], cf[names.name("embed")]
    delta = _outputs(model, cf, reg) - _outputs(model, graph.activations, reg)
    per_point = []
    for k in (1, 2, 3):
        point = build_graph(model, tokens, metric, attention_mask=mask, embed=e_cf + k / 3 * (e - e_cf))
        per_point.append(torch.einsum("bpud,bpnd->bun", delta, _gradients(point, reg)) * one.graph.adjacency)
    torch.testing.assert_close(three.scores, sum(per_point) / 3, rtol=1e-9, atol=1e-12)
    assert three.table()["embed->logits"] == pytest.approx(float(three.of("embed->logits").sum()))


def test_bad_inputs_are_named():
    model = family_model("gpt2", n_layers=2)
    tokens, mask, metric = prompts("gpt2")
    with pytest.raises(GradGraphError, match="align"):
        eap(model, tokens, tokens[:, :5], metric)
    with pytest.raises(GradGraphError, match="steps"):
        eap(model, tokens, tokens, metric, steps=0)
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
