"""The component registry, component views, branch shares and component paths on tiny models."""

import pytest
import torch

from gradgraph import GradGraphError, backprop, build_graph, tiny_model, top_paths
from gradgraph.arch import names
from gradgraph.branches import branch_shares
from gradgraph.component_graph import component_graph
from gradgraph.components import component_path, component_values, top_component_paths
from gradgraph.labels import Component, Registry
from gradgraph.metrics import logit_diff
from gradgraph.paths import gradient_flow
from gradgraph.semirings import Abs, Entropy, Max, Real


@pytest.fixture(scope="module")
def graph():
    model = tiny_model("llama", dtype=torch.float64, n_layers=2, n_heads=4, n_key_value_heads=2, seed=7)
    tokens = torch.tensor([[3, 4, 5, 6, 7], [8, 9, 10, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    return build_graph(model, tokens, logit_diff(torch.tensor([1, 2]), torch.tensor([3, 4])), attention_mask=mask)


def test_labels():
    reg = Registry(n_layers=4, n_heads=6, n_key_value_heads=2, embeds=("hook_embed",))
    assert reg.label(Component("head", 3, 5, 5)) == "L3H5@5"
    assert reg.label(Component("q", 3, 5, 5)) == "L3H5.q@5"
    assert reg.label(Component("k", 3, 1, 5)) == "L3H3-5.k@5"
    assert reg.label(Component("mlp", 2, None, 5)) == "MLP2@5" and reg.label(Component("embed", position=2)) == "embed@2"
    assert reg.label(Component("head", 1, 2)) == "L1H2" and reg.label(Component("mlp", 0)) == "MLP0"


@pytest.mark.parametrize("kv_heads", [2, 6])
def test_registry_round_trips_every_label(kv_heads):
    reg = Registry(n_layers=3, n_heads=6, n_key_value_heads=kv_heads, embeds=("hook_embed", "hook_pos_embed"))
    for positions in (None, range(4)):
        components = reg.components(positions=positions)
        labels = [reg.label(c) for c in components]
        assert len(set(labels)) == len(labels)
        assert [reg.parse(label) for label in labels] == components
    per_position = 1 + 3 * (6 + kv_heads + kv_heads + 6 + 1)
    assert len(reg.components(positions=range(4))) == 4 * per_position


def test_registry_nodes_and_bad_labels():
    reg = Registry(n_layers=2, n_heads=4, n_key_value_heads=2, embeds=("hook_embed",))
    assert reg.nodes(reg.parse("L1H2-3.k@0")) == ("blocks.1.hook_k_input",)
    assert reg.index(reg.parse("L1H2-3.k@0")) == (slice(None), 0, 1)
    assert reg.nodes(reg.parse("L0H3")) == ("blocks.0.attn.hook_z",)
    assert reg.index(reg.parse("MLP1")) == (slice(None), slice(None))
    for bad, match in (("L2H0", "layers 0-1"), ("L0H4", "head outside"), ("L0H1-2.k", "groups of 2"),
                       ("head7", "not a component label"), ("L0H0-1.q", "only key and value")):
        with pytest.raises(GradGraphError, match=match):
            reg.parse(bad)


@pytest.mark.parametrize("semiring", [Real, Abs])
def test_component_values_sum_back_to_node_values(graph, semiring):
    values = backprop(graph, semiring)
    rows = component_values(graph, values, semiring)
    for layer in range(graph.n_layers):
        for kind, node in (("q", "q_input"), ("k", "k_input"), ("v", "v_input"), ("head", "z"), ("mlp", "mlp_out")):
            total = sum(r["value"] for r in rows if r["kind"] == kind and r["layer"] == layer)
            expected = values[names.name(node, layer)][0][graph.source_mask].sum().item()
            assert total == pytest.approx(expected, rel=1e-9, abs=1e-12)
    # padded positions are not components
    assert not [r for r in rows if r["batch"] == 1 and r["position"] >= 3]
    assert {r["component"] for r in rows if r["kind"] == "k" and r["layer"] == 0 and r["position"] == 0} == {
        "L0H0-1.k@0", "L0H2-3.k@0"}


@pytest.mark.parametrize("agg", ["oplus", "bucket_sum"])
def test_branch_shares_sum_to_one_and_follow_the_best_path(graph, agg):
    shares = branch_shares(graph, -1, agg=agg)
    assert torch.allclose(shares.share.sum(-1), torch.ones(graph.n_layers, dtype=torch.float64))
    for branch in ("q", "k", "v"):  # per head values add up to the branch total
        assert torch.allclose(shares.head_value[branch].sum(-1), shares.value[:, "qkv".index(branch)])
    if agg == "oplus":  # the ⊕-max over branches is the best path value at the attention input
        best = backprop(graph, Max)
        for layer in range(graph.n_layers):
            node = best[names.name("resid_pre", layer)][0]
            expected = torch.stack([node[0, 4].max(), node[1, 2].max()]).mean()
            assert shares.value[layer].sum().item() == pytest.approx(expected.item(), rel=1e-12)


def test_branch_shares_with_abs_sum_equals_flow_split(graph):
    shares = branch_shares(graph, torch.tensor([1, 2]), semiring=Abs, agg="sum")
    values = backprop(graph, Abs, dtype=torch.float64)
    # at the attention input of layer 0, q/k/v/skip sums partition the node's backward value
    total = values[names.name("resid_pre", 0)][0]
    expected = (total[0, 1].sum() + total[1, 2].sum()) / 2
    assert shares.value[0].sum().item() == pytest.approx(expected.item(), rel=1e-10)


def test_branch_shares_bad_inputs(graph):
    with pytest.raises(GradGraphError, match="outside prompt 1, which has 3 tokens"):
        branch_shares(graph, torch.tensor([0, 4]))
    with pytest.raises(GradGraphError, match="agg must be one of"):
        branch_shares(graph, -1, agg="mean")
    with pytest.raises(GradGraphError, match="semiring=Max"):
        branch_shares(graph, -1, semiring=Real, agg="oplus")
    with pytest.raises(GradGraphError, match="semiring=Max"):
        branch_shares(graph, -1, semiring=Entropy, agg="sum")


def test_component_paths_collapse_scalar_paths(graph):
    reg = Registry.of(graph)
    paths = top_paths(graph, k=6)
    for item, item_paths in enumerate(paths):
        for path in item_paths:
            steps = component_path(graph, path.nodes)
            assert steps[0] == f"embed@{path.nodes[0][1][1]}" and steps[-1] == "metric"
            assert all(a != b for a, b in zip(steps, steps[1:]))
            # exactly the component nodes of the scalar path, in order, each a registry label
            expected = [reg.label(Component(*reg.kind_of_node(name), index[2] if len(index) > 3 else None, index[1]))
                        for name, index in path.nodes if reg.kind_of_node(name) and name not in graph.sources]
            dedup = [s for i, s in enumerate(expected) if i == 0 or s != expected[i - 1]]
            assert list(steps[1:-1]) == dedup
            layers = [reg.parse(s).layer for s in steps[1:-1]]
            assert layers == sorted(layers)  # a path only moves forward through the layers
    ranked = top_component_paths(graph, k=3, search=6)
    for item_ranked, item_paths in zip(ranked, paths):
        weights = [abs(w) for _, w, _ in item_ranked]
        assert weights == sorted(weights, reverse=True)
        assert weights[0] == pytest.approx(item_paths[0].magnitude)
        collapsed = [component_path(graph, p.nodes) for p in item_paths]
        for labels, weight, count in item_ranked:
            assert count == collapsed.count(labels)  # every scalar path that collapses into it
            best = max(abs(p.weight) for p, c in zip(item_paths, collapsed) if c == labels)
            assert abs(weight) == pytest.approx(best)


def test_a_path_prints_as_a_person_reads_it():
    """Residual runs collapse into one step with the layers they skip, components print by label,
    the full form spells every node (the README's first example)."""
    from gradgraph.paths import GradientPath

    reg = Registry(n_layers=2, n_heads=4, n_key_value_heads=2, embeds=("hook_embed",))
    n = names.name
    through_mlp = ((n("embed"), (0, 5, 25)), (n("resid_pre", 0), (0, 5, 25)), (n("resid_mid", 0), (0, 5, 25)),
                   (n("mlp_in", 0), (0, 5, 25)), (n("ln2_normalized", 0), (0, 5, 25)), (n("mlp_pre", 0), (0, 5, 53)),
                   (n("mlp_post", 0), (0, 5, 53)), (n("mlp_out", 0), (0, 5, 247)), (n("resid_post", 0), (0, 5, 247)),
                   (n("resid_pre", 1), (0, 5, 247)), (n("resid_mid", 1), (0, 5, 247)), (n("resid_post", 1), (0, 5, 247)),
                   (n("ln_final_normalized"), (0, 5, 247)), (n("unembed_in"), (0, 5, 247)), (n("logits"), (0, 5, 314)),
                   ("metric", (0,)))
    path = GradientPath(0.5, through_mlp, reg)
    assert str(path) == ("+0.5: embed@5[25] → resid@5[25] × 1 layer → MLP0@5 (neuron 53) → resid@5[247] × 1 layer "
                         "→ logit[314] → metric")
    assert path.full().startswith("+0.5: hook_embed[0, 5, 25] → blocks.0.hook_resid_pre[0, 5, 25] → ")
    assert path.full().count(" → ") == len(through_mlp) - 1
    through_value = ((n("embed"), (0, 2, 7)), (n("resid_pre", 0), (0, 2, 7)), (n("v_input", 0), (0, 2, 1, 7)),
                     (n("ln1_normalized", 0, "v"), (0, 2, 1, 7)), (n("v", 0), (0, 2, 1, 3)), (n("z", 0), (0, 4, 3, 3)),
                     (n("attn_out", 0), (0, 4, 9)), (n("resid_mid", 0), (0, 4, 9)), (n("resid_post", 0), (0, 4, 9)),
                     (n("resid_pre", 1), (0, 4, 9)), (n("resid_mid", 1), (0, 4, 9)), (n("resid_post", 1), (0, 4, 9)),
                     (n("logits"), (0, 4, 2)), ("metric", (0,)))
    assert GradientPath(-0.25, through_value, reg).steps == (
        "embed@2[7]", "L0H2-3.v@2", "L0H3@4", "resid@4[9] × 2 layers", "logit[2]", "metric")
    assert str(GradientPath(1.0, through_value)).startswith("+1: hook_embed[0, 2, 7] → ")  # no registry: every node


def test_top_paths_print_their_components(graph):
    for item_paths in top_paths(graph, k=6):
        for path in item_paths:
            steps = path.steps
            assert not any("hook_" in s or "blocks." in s for s in steps)
            assert steps[0] == f"embed@{path.nodes[0][1][1]}[{path.nodes[0][1][-1]}]" and steps[-1] == "metric"
            labels = [s.split(" (neuron")[0] for s in steps if s[0] in "LM"]
            assert labels == list(component_path(graph, path.nodes)[1:-1])  # the same components, in order
            assert str(path).startswith(f"{path.weight:+.4g}: embed@")


def test_flow_is_conserved_at_every_residual_cut(graph):
    """Every input→metric path crosses each layer's residual stream once and passes from a head's z
    to attn_out: the flows through those cuts equal the total."""
    flow = gradient_flow(graph)
    total = flow["metric"]
    for layer in range(graph.n_layers):
        resid = flow[names.name("resid_pre", layer)].flatten(1).sum(1)
        assert torch.allclose(resid, total, rtol=1e-10)
        z = flow[names.name("z", layer)].flatten(1).sum(1)
        out = flow[names.name("attn_out", layer)].flatten(1).sum(1)
        assert torch.allclose(z, out, rtol=1e-10) and (z > 0).all() and (z < total).all()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_component_graph_conserves_the_scalar_graphs_flow(arch):
    """Abs flows between components: the metric receives the scalar graph's total flow, the
    embeddings send it, and every component passes on exactly what it receives."""
    kw = dict(n_heads=4, n_key_value_heads=2) if arch == "llama" else {}
    model = tiny_model(arch, dtype=torch.float64, n_layers=2, seed=8, **kw)
    tokens = torch.tensor([[3, 4, 5, 6], [8, 9, 10, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    g = build_graph(model, tokens, logit_diff(torch.tensor([1, 2]), torch.tensor([3, 4])), attention_mask=mask)
    flow = gradient_flow(g)
    for b in range(2):
        cg = component_graph(g, Abs, batch=b, min_share=0)
        total = flow["metric"][b].item()
        assert cg.graph["total"] == pytest.approx(total, rel=1e-12)
        assert sum(d["weight"] for *_, d in cg.in_edges("metric", data=True)) == pytest.approx(total, rel=1e-10)
        for node in cg.nodes:
            if node == "metric" or node.startswith("embed"):
                continue
            into = sum(d["weight"] for *_, d in cg.in_edges(node, data=True))
            out = sum(d["weight"] for *_, d in cg.out_edges(node, data=True))
            assert into == pytest.approx(out, rel=1e-9, abs=1e-12 * total), node
        # a head's output flow equals the scalar flow through its hook_z elements
        last = int(mask[b].sum()) - 1  # in the last layer only the metric's position reaches it
        head = flow[names.name("z", 1)][b, last, 1].sum().item()
        assert cg.nodes[f"L1H1@{last}"]["flow"] == pytest.approx(head, rel=1e-9)
        assert f"L1H1@{last - 1}" not in cg
    pruned = component_graph(g, Abs, batch=0, min_share=0.05)
    assert 0 < pruned.number_of_edges() < cg.number_of_edges()
    with pytest.raises(GradGraphError, match="outside the graph's batch"):
        component_graph(g, Abs, batch=2)
