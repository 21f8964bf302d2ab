"""Component views, branch shares and component paths on tiny models."""

import pytest
import torch

from gradgraph import GradGraphError, backprop, build_graph, hooks, tiny_model, top_paths
from gradgraph.components import (
    branch_shares,
    component_graph,
    component_path,
    component_values,
    label,
    top_component_paths,
)
from gradgraph.metrics import logit_diff
from gradgraph.paths import gradient_flow
from gradgraph.semirings import Abs, Max, Real


@pytest.fixture(scope="module")
def graph():
    model = tiny_model("llama", dtype=torch.float64, n_layers=2, n_heads=4, n_key_value_heads=2, seed=7)
    tokens = torch.tensor([[3, 4, 5, 6, 7], [8, 9, 10, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    return build_graph(model, tokens, logit_diff(torch.tensor([1, 2]), torch.tensor([3, 4])), attention_mask=mask)


def test_labels():
    class G:  # a graph stand-in with grouped-query attention: 6 heads, 2 key/value heads
        n_heads, n_key_value_heads = 6, 2

    assert label("out", 3, 7, 5) == "L3H7@5"
    assert label("q", 3, 7, 5, G) == "L3H7.q@5"
    assert label("k", 3, 1, 5, G) == "L3H3-5.k@5"
    assert label("mlp", 5, None, 5) == "MLP5@5" and label("embed", None, None, 2) == "embed@2"


@pytest.mark.parametrize("semiring", [Real, Abs])
def test_component_values_sum_back_to_node_values(graph, semiring):
    values = backprop(graph, semiring)
    rows = component_values(graph, values, semiring)
    for layer in range(graph.n_layers):
        for kind, node in (("q", "q_input"), ("k", "k_input"), ("v", "v_input"), ("out", "z"), ("mlp", "mlp_out")):
            total = sum(r["value"] for r in rows if r["kind"] == kind and r["layer"] == layer)
            expected = values[hooks.name(node, layer)][0][graph.source_mask].sum().item()
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
            node = best[hooks.name("resid_pre", layer)][0]
            expected = torch.stack([node[0, 4].max(), node[1, 2].max()]).mean()
            assert shares.value[layer].sum().item() == pytest.approx(expected.item(), rel=1e-12)


def test_branch_shares_with_abs_sum_equals_flow_split(graph):
    shares = branch_shares(graph, torch.tensor([1, 2]), semiring=Abs, agg="sum")
    values = backprop(graph, Abs, dtype=torch.float64)
    # at the attention input of layer 0, q/k/v/skip sums partition the node's backward value
    total = values[hooks.name("resid_pre", 0)][0]
    expected = (total[0, 1].sum() + total[1, 2].sum()) / 2
    assert shares.value[0].sum().item() == pytest.approx(expected.item(), rel=1e-10)


def test_branch_shares_bad_inputs(graph):
    with pytest.raises(GradGraphError, match="outside prompt 1, which has 3 tokens"):
        branch_shares(graph, torch.tensor([0, 4]))
    with pytest.raises(GradGraphError, match="agg must be one of"):
        branch_shares(graph, -1, agg="mean")
    with pytest.raises(GradGraphError, match="semiring=Max"):
        branch_shares(graph, -1, semiring=Real, agg="oplus")


def test_component_paths_collapse_scalar_paths(graph):
    paths = top_paths(graph, k=6)
    for item, item_paths in enumerate(paths):
        for path in item_paths:
            steps = component_path(graph, path.nodes)
            assert steps[0].startswith("embed@") and steps[-1] == "metric"
            assert all(a != b for a, b in zip(steps, steps[1:]))
    ranked = top_component_paths(graph, paths, k=3)
    for item_ranked, item_paths in zip(ranked, paths):
        weights = [abs(w) for _, w, _ in item_ranked]
        assert weights == sorted(weights, reverse=True)
        assert weights[0] == pytest.approx(item_paths[0].magnitude)
        assert sum(n for _, _, n in item_ranked) <= len(item_paths)


def test_gradient_flow_through_heads_is_bounded_by_total(graph):
    flow = gradient_flow(graph)
    total = flow["metric"]
    for layer in range(graph.n_layers):
        z = flow[hooks.name("z", layer)]
        assert (z.sum(dim=(1, 2, 3)) <= total * (1 + 1e-12)).all()


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
        head = flow[hooks.name("z", 1)][b, last, 1].sum().item()
        assert cg.nodes[f"L1H1@{last}"]["flow"] == pytest.approx(head, rel=1e-9)
        assert f"L1H1@{last - 1}" not in cg
    pruned = component_graph(g, Abs, batch=0, min_share=0.05)
    assert 0 < pruned.number_of_edges() < cg.number_of_edges()
    with pytest.raises(GradGraphError, match="outside the graph's batch"):
        component_graph(g, Abs, batch=2)


def test_component_level_top_paths(graph):
    paths = top_paths(graph, k=2, level="component")
    assert len(paths) == 2 and all(len(p) <= 2 for p in paths)
    labels, weight, count = paths[0][0]
    assert labels[0].startswith("embed@") and labels[-1] == "metric" and count >= 1
