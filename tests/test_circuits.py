"""Circuits and their faithfulness: the full circuit is the model and the empty one its run on the
counterfactuals (to float64 rounding), ablating every edge into a node is patching that node's
input, selection keeps what scores highest and prunes dead nodes, and the areas follow MIB's rule."""

import pytest
import torch

from gradgraph import GradGraphError
from gradgraph.arch import names
from gradgraph.circuit_faithfulness import SIZES, circuit_metric, faithfulness_curve
from gradgraph.circuits import Circuit, above, prune, top_edges
from gradgraph.edge_methods import edge_scores
from gradgraph.edges import edge_graph
from gradgraph.metrics import prepare

from conftest import no_hooks_left
from test_edges import _counterfactual
from test_families import family_model, prompts


def _setup(family="llama", **kw):
    model = family_model(family, n_layers=2, seed=11, **kw)
    tokens, mask, metric = prompts(family)
    return model, tokens, mask, metric, _counterfactual(tokens, mask)


def _metric(model, tokens, mask, metric, hooks=()):
    with torch.no_grad():
        return prepare(metric, model)(model.run_with_hooks(tokens, fwd_hooks=list(hooks)), mask)


@pytest.mark.parametrize("family", ["gpt2", "llama", "pythia", "attn-only"])
def test_the_full_circuit_is_the_model_and_the_empty_one_its_counterfactual_run(family):
    kw = dict(n_key_value_heads=2) if family == "llama" else {}
    model, tokens, mask, metric, other = _setup(family, **kw)
    graph = edge_graph(model)
    full = circuit_metric(model, tokens, other, metric, Circuit.full(graph), attention_mask=mask)
    empty = circuit_metric(model, tokens, other, metric, Circuit.empty(graph), attention_mask=mask)
    torch.testing.assert_close(full, _metric(model, tokens, mask, metric), rtol=0, atol=1e-9)
    torch.testing.assert_close(empty, _metric(model, other, mask, metric), rtol=0, atol=1e-9)
    assert (full - empty).abs().min() > 1e-4  # the counterfactual changes the metric
    assert no_hooks_left(model)


def test_ablating_every_edge_into_a_node_is_patching_its_input():
    model, tokens, mask, metric, other = _setup(n_key_value_heads=2)
    graph = edge_graph(model)
    from gradgraph.arch import hooks

    hook = names.name("k_input", 1)
    with hooks.recording(model, names={hook}) as store:
        model(other)
    cf = store[hook][0]
    for d_label, head in (("L1H2-3.k", 1), ("MLP0", None), ("logits", None)):
        d = graph.downstream.index(d_label)
        circuit = Circuit(graph, graph.adjacency.clone())
        circuit.edges[:, d] = False
        got = circuit_metric(model, tokens, other, metric, circuit, attention_mask=mask)
        if d_label == "L1H2-3.k":
            def patch(x, hook=None):
                x = x.clone()
                x[:, :, head] = cf[:, :, head]
                return x
            expected = _metric(model, tokens, mask, metric, [(hook, patch)])
        else:
            site = names.name("mlp_in", 0) if d_label == "MLP0" else names.name("resid_post", 1)
            with hooks.recording(model, names={site}) as cf_store:
                model(other)
            expected = _metric(model, tokens, mask, metric, [(site, lambda x, hook=None, v=cf_store[site][0]: v)])
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-9)
    assert no_hooks_left(model)


def test_selection_keeps_the_best_edges_and_prunes_dead_nodes():
    model, tokens, mask, metric, other = _setup()
    graph = edge_graph(model)
    # an edge out of a head nothing feeds is dead; with an edge into its query it lives
    assert len(prune(Circuit.of(graph, ["L1H0->logits"]))) == 0
    assert prune(Circuit.of(graph, ["L1H0->logits", "embed->L1H0.q"])).labels == ["embed->L1H0.q", "L1H0->logits"]
    # an edge into an MLP whose output goes nowhere is dead
    assert len(prune(Circuit.of(graph, ["embed->MLP0"]))) == 0
    scores = edge_scores(model, tokens, metric, other, method="eap", attention_mask=mask)
    total = scores.scores.sum(0)
    best = top_edges(scores, 5, prune=False)
    assert len(best) == 5 and total[best.edges].abs().min() >= total[graph.adjacency & ~best.edges].abs().max()
    signed = top_edges(scores, 5, absolute=False, prune=False)
    assert total[signed.edges].min() >= total[graph.adjacency & ~signed.edges].max()
    assert len(top_edges(scores, 5)) <= 5 and torch.equal(top_edges(scores, len(graph)).edges, graph.adjacency)
    cut = float(total.abs()[best.edges].min())
    assert torch.equal(above(scores, cut - 1e-12, prune=False).edges, best.edges)
    with pytest.raises(GradGraphError, match="n must be"):
        top_edges(scores, len(graph) + 1)
    with pytest.raises(GradGraphError, match="not an edge label"):
        Circuit.of(graph, ["L9H0->logits"])


def test_the_sweep_ends_at_one_and_its_areas_are_trapezoids():
    model, tokens, mask, metric, other = _setup()
    scores = edge_scores(model, tokens, metric, other, method="eap", attention_mask=mask)
    curve = faithfulness_curve(model, tokens, other, metric, scores, sizes=(0.1, 0.3, 1.0), attention_mask=mask)
    f = curve.faithfulness()
    assert f[-1] == pytest.approx(1.0, abs=1e-9) and curve.edges[-1] == len(scores.graph)
    areas = curve.areas("fixed")
    x = torch.tensor([0.1, 0.3, 1.0], dtype=f.dtype)
    assert areas["CPR"] == pytest.approx(float(((f[1:] + f[:-1]) / 2 * x.diff()).sum()))
    assert areas["CMD"] == pytest.approx(float((((1 - f[1:]).abs() + (1 - f[:-1]).abs()) / 2 * x.diff()).sum()))
    own = curve.areas("own")
    assert own != areas or curve.shares == (0.1, 0.3, 1.0)
    lo, hi = curve.intervals("fixed", resamples=50)["CPR"]
    assert lo <= hi
    with pytest.raises(GradGraphError, match="sizes"):
        faithfulness_curve(model, tokens, other, metric, scores, sizes=(0.0, 0.5))
    with pytest.raises(GradGraphError, match="sizes"):
        faithfulness_curve(model, tokens, other, metric, scores, sizes=(0.5, 1.5))
    with pytest.raises(GradGraphError, match="convention"):
        curve.areas("paper")
    assert len(SIZES) == 10
    assert no_hooks_left(model)


def test_mean_ablation_and_bad_inputs():
    model, tokens, mask, metric, other = _setup()
    graph = edge_graph(model)
    mean_empty = circuit_metric(model, tokens, other, metric, Circuit.empty(graph), attention_mask=mask, ablation="mean")
    assert not torch.allclose(mean_empty, circuit_metric(model, tokens, other, metric, Circuit.empty(graph), attention_mask=mask))
    with pytest.raises(GradGraphError, match="ablation"):
        circuit_metric(model, tokens, other, metric, Circuit.empty(graph), ablation="zero")
    with pytest.raises(GradGraphError, match="align"):
        circuit_metric(model, tokens, other[:, :4], metric, Circuit.empty(graph))
    with pytest.raises(GradGraphError, match="Circuit"):
        circuit_metric(model, tokens, other, metric, ["L0H0->logits"])
    assert no_hooks_left(model)


def test_ioi_items_align_with_their_counterfactuals(smol_tokenizer):
    from gradgraph.data.ioi import TEMPLATES, ioi_items

    items = ioi_items(smol_tokenizer, 40, seed=3)
    assert {i.order for i in items} == {"ABBA", "BABA"} and {i.template for i in items} == set(range(len(TEMPLATES)))
    for item in items:
        a, b = (smol_tokenizer.encode(t, add_special_tokens=False) for t in (item.prompt, item.counterfactual))
        assert len(a) == len(b) and sum(x != y for x, y in zip(a, b)) == 3  # the three names, and nothing else
        assert item.io != item.s and item.io in item.prompt and item.prompt.count(item.s) == 2
        assert item.io not in item.counterfactual and item.s not in item.counterfactual
    assert ioi_items(smol_tokenizer, 40, seed=3) == items
    with pytest.raises(GradGraphError, match="tokenizer"):
        ioi_items(None, 4)
    with pytest.raises(GradGraphError, match="positive"):
        ioi_items(smol_tokenizer, 0)


@pytest.mark.real
def test_the_embedded_model_does_ioi(smol_model):
    from gradgraph.data.ioi import ioi_items
    from gradgraph.metrics import logit_diff
    from gradgraph.prompts import to_tokens

    items = ioi_items(smol_model.tokenizer, 32)
    tokens, mask = to_tokens(smol_model, [i.prompt for i in items])
    other, _ = to_tokens(smol_model, [i.counterfactual for i in items])
    metric = logit_diff([i.io for i in items], [i.s for i in items])
    clean, corrupt = _metric(smol_model, tokens, mask, metric), _metric(smol_model, other, mask, metric)
    assert (clean > 0).float().mean() >= 0.95 and corrupt.mean().abs() < 0.25 * clean.mean()


def test_a_mixed_circuit_equals_ablating_its_edges_one_sum_at_a_time():
    """Each input's shift taken either way (the ablated edges' sum, or the whole change less the kept
    edges) equals the plain sum over the ablated edges, on random circuits of every density."""
    from gradgraph.circuit_faithfulness import _ablated
    from gradgraph.edge_methods import _W_O

    model, tokens, mask, metric, other = _setup(n_key_value_heads=2)
    graph = edge_graph(model)
    reg = graph.registry
    _, _, values = _ablated(model, tokens, other, metric, mask, "counterfactual", reg)
    gen = torch.Generator().manual_seed(0)
    for density in (0.05, 0.5, 0.95):
        circuit = Circuit(graph, graph.adjacency & (torch.rand(graph.adjacency.shape, generator=gen) < density))
        live = torch.zeros_like(values)
        out = (graph.adjacency & ~circuit.edges).double()
        down = {label: i for i, label in enumerate(graph.downstream)}

        def write(at, fn):
            def hook(x, hook=None):
                live[:, :, at] = fn(x)
            return hook

        def read(labels):
            ds = [down[label] for label in labels]

            def hook(x, hook=None):
                shift = torch.einsum("bpud,un->bpnd", values - live, out[:, ds])
                return x + (shift if x.ndim == 4 else shift[:, :, 0])
            return hook

        hooks = [(names.name("resid_pre", 0), write(slice(0, 1), lambda x: x[:, :, None]))]
        for layer in range(2):
            first = graph.upstream.index(f"L{layer}H0")
            W = _W_O(model, layer, torch.float64)
            hooks.append((names.name("z", layer), write(slice(first, first + 4), lambda z, W=W: torch.einsum("bphe,hed->bphd", z, W))))
            m = graph.upstream.index(f"MLP{layer}")
            hooks.append((names.name("mlp_out", layer), write(slice(m, m + 1), lambda x: x[:, :, None])))
            for kind, labels in (("q", [f"L{layer}H{h}.q" for h in range(4)]), ("k", [f"L{layer}H0-1.k", f"L{layer}H2-3.k"]),
                                 ("v", [f"L{layer}H0-1.v", f"L{layer}H2-3.v"])):
                hooks.append((names.name(f"{kind}_input", layer), read(labels)))
            hooks.append((names.name("mlp_in", layer), read([f"MLP{layer}"])))
        hooks.append((names.name("resid_post", 1), read(["logits"])))
        expected = _metric(model, tokens, mask, metric, hooks)
        got = circuit_metric(model, tokens, other, metric, circuit, attention_mask=mask)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-9)
    assert no_hooks_left(model)


def test_the_circuit_in_eap_igs_graph_json():
    import json

    from gradgraph.circuit_export import eap_ig_graph

    model, tokens, mask, metric, other = _setup(n_key_value_heads=2)
    scores = edge_scores(model, tokens, metric, other, method="eap", attention_mask=mask)
    circuit = Circuit.of(scores.graph, ["embed->L0H1.q", "embed->L0H0-1.k", "L0H1->logits"])
    data = json.loads(json.dumps(eap_ig_graph(scores, circuit)))
    assert set(data) == {"cfg", "nodes", "edges"} and data["cfg"]["n_layers"] == 2 and data["cfg"]["d_model"] == 32
    # every edge once per query head it reaches: q per head, k and v for both heads of a group
    # each layer's 4 key/value inputs (2 groups × k, v) read 1 + 5 · layer upstream nodes, and each edge into
    # one is written twice
    assert len(data["edges"]) == len(scores.graph) + sum(4 * (1 + 5 * layer) for layer in range(2))
    inside = sorted(name for name, e in data["edges"].items() if e["in_graph"])
    assert inside == ["a0.h1->logits", "input->a0.h0<k>", "input->a0.h1<k>", "input->a0.h1<q>"]
    assert data["edges"]["input->a0.h1<q>"]["score"] == pytest.approx(float(scores.of("embed->L0H1.q").sum()))
    assert [n for n, v in data["nodes"].items() if v["in_graph"]] == ["input", "a0.h0", "a0.h1", "logits"]


def test_a_top_path_circuit_follows_the_best_paths():
    """Each of the best paths leaves embed and reaches the logits, entering each component it leaves
    next; its edges' best path (the ``max`` score) is the path itself."""
    from gradgraph.build import build_graph
    from gradgraph.circuits import path_edges, top_path_circuit
    from gradgraph.paths import top_paths

    model, tokens, mask, metric, _ = _setup(n_key_value_heads=2)
    graph = build_graph(model, tokens, metric, attention_mask=mask)
    edges = edge_graph(model)
    circuit = top_path_circuit(graph, edges, 3)
    assert 0 < len(circuit) and torch.equal(prune(circuit).edges, circuit.edges)
    best = edge_scores(model, tokens, metric, method="max", attention_mask=mask).scores
    reg = edges.registry
    for item, paths in enumerate(top_paths(graph, 1)):
        chain = path_edges(paths[0], edges)
        assert chain[0].startswith("embed->") and chain[-1].endswith("->logits")
        for before, after in zip(chain, chain[1:]):
            entered, left = before.split("->")[1], after.split("->")[0]
            c = reg.parse(entered)
            assert left == (entered if c.kind == "mlp" else f"L{c.layer}H{left.split('H')[1]}")
            assert c.kind == "mlp" or c.kind == "q" and left == f"L{c.layer}H{c.head}" or int(left.split("H")[1]) in reg.group(c.head)
        for edge in chain:
            assert float(best[item][edges.index(edge)]) == pytest.approx(paths[0].magnitude, rel=1e-9)
        assert all(circuit.edges[edges.index(e)] for e in chain)
    with pytest.raises(GradGraphError, match="k must be"):
        top_path_circuit(graph, edges, 0)


def test_the_circuit_drawn_and_in_circuit_tracers_json(tmp_path):
    from gradgraph import plot
    from gradgraph.circuit_tracer import circuit_tracer_circuit
    from gradgraph.circuits import layout

    model, tokens, mask, metric, other = _setup(n_key_value_heads=2)
    scores = edge_scores(model, tokens, metric, other, attention_mask=mask)
    circuit = top_edges(scores, 30)
    drawn = layout(circuit, scores)
    reg, total = circuit.graph.registry, scores.scores.sum(0)
    for label in circuit.labels:  # every edge drawn, into its own component (a grouped input: heads of its group)
        up, down = label.split("->")
        lines = [e for e in drawn.edges if (e.upstream, e.input) == (up, down)]
        u, d = circuit.graph.index(label)
        assert lines and all(abs(e.score - float(total[u, d])) < 1e-12 for e in lines)
        owners = {e.component for e in lines}
        if down.endswith((".k", ".v")):
            group = {f"L{reg.parse(down).layer}H{h}" for h in reg.group(reg.parse(down).head)}
            assert owners <= group and len(lines) == len(owners)
        else:
            assert owners == {down.split(".")[0]}
    assert {(e.upstream, e.input) for e in drawn.edges} == {tuple(label.split("->")) for label in circuit.labels}
    assert all(drawn.places[e.upstream][0] < drawn.places[e.component][0] for e in drawn.edges)  # left to right
    graph = circuit_tracer_circuit(drawn, slug="t", model="tiny", tokens=list("abcdefg"), prompt="abcdefg", good="x", bad="y")
    ids = [n["node_id"] for n in graph["nodes"]]
    assert len(ids) == len(set(ids)) == len(drawn.places)
    assert all(link["source"] in ids and link["target"] in ids for link in graph["links"])
    assert abs(sum(link["weight"] for link in graph["links"]) - sum(e.score for e in drawn.edges)) < 1e-9
    assert abs(sum(n["influence"] for n in graph["nodes"]) - 1) < 1e-9
    assert plot.circuit_drawing(drawn, tmp_path / "c.png", title="t").stat().st_size > 10_000


def test_copying_items_align_with_their_counterfactuals(smol_tokenizer):
    from gradgraph.data.copying import copying_items

    items = copying_items(smol_tokenizer, 30, seed=2)
    for item in items:
        a, b = (smol_tokenizer.encode(t, add_special_tokens=False) for t in (item.prompt, item.counterfactual))
        words = item.prompt.split()
        assert len(a) == len(b) == item.length + item.copied and sum(x != y for x, y in zip(a, b)) == 1
        assert words[: item.copied] == words[item.length:] and " " + words[item.copied] == item.good
        assert item.bad.strip() not in words and item.bad.strip() in item.counterfactual.split()
    assert copying_items(smol_tokenizer, 30, seed=2) == items and {i.copied for i in items} == {1, 2, 3, 4}
    for bad in (dict(n=0), dict(length=2)):
        with pytest.raises(GradGraphError):
            copying_items(smol_tokenizer, **{"n": 3, **bad})


@pytest.mark.real
@pytest.mark.parametrize("task", ["sva", "copying"])
def test_the_embedded_model_does_sva_and_copying(smol_model, task):
    """The items ``gradgraph circuit`` keeps are those the model gets right, and their counterfactuals
    turn the metric round on average."""
    from gradgraph.metrics import logit_diff
    from gradgraph.studies.circuit import Config, _task

    tokens, mask, other, good, bad, description = _task(smol_model, Config(task=task, items=24))
    clean, corrupt = (_metric(smol_model, t, mask, logit_diff(good, bad)) for t in (tokens, other))
    assert len(clean) == 24 and (clean > 0).all() and corrupt.mean() < 0.5 * clean.mean(), (clean.mean(), corrupt.mean())
    right = float(description.split("right on ")[1].split("%")[0])
    assert right >= (65 if task == "sva" else 60), description
