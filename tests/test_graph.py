"""The gradient graph: Real backprop equals autograd, paths and entropy equal brute force, and bad
inputs raise GradGraphError with no hook left on the model."""

import math

import networkx as nx
import pytest
import torch

import gradgraph
from gradgraph import GradGraphError, backprop, build_graph, tiny_model
from gradgraph.arch import hooks, names
from gradgraph.metrics import logit_diff, logprob_diff
from gradgraph.semirings import Abs, KMax, Log, Real

from conftest import no_hooks_left


def autograd_gradients(model, tokens, metric, mask=None) -> dict[str, torch.Tensor]:
    """Reference: torch autograd gradient of metric.sum() at every firing of every hook point."""
    with hooks.recording(model, keep_grad=True) as store:
        logits = model(tokens)
    metric(logits, mask).sum().backward()
    model.zero_grad(set_to_none=True)
    return {name: t.grad for name, t in hooks.node_firings(store).items() if t.grad is not None}


def compare_with_autograd(graph, values, reference, tol) -> int:
    """Assert |ours − autograd| <= tol · max|autograd| (per node, floored at 1); returns nodes compared."""
    missing = [name for name in reference if name not in graph.shapes]
    assert not missing, f"hook points with a gradient but no graph node: {missing}"
    for name, grad in reference.items():
        if name == names.name("logits"):  # only the logits the metric reads are nodes
            others = [i for i in range(grad.shape[-1]) if i not in set(graph.logit_ids.tolist())]
            assert grad[..., others].abs().max() == 0
            grad = grad[..., graph.logit_ids]
        assert values[name].shape == (1, *grad.shape), name
        err = (values[name][0] - grad).abs().max().item()
        assert err <= tol * max(1.0, grad.abs().max().item()), (name, err)
    return len(reference)


def assert_real_matches_autograd(model, tokens, metric, mask=None, atol=1e-10):
    graph = build_graph(model, tokens, metric, attention_mask=mask)
    values = backprop(graph, Real)
    assert compare_with_autograd(graph, values, autograd_gradients(model, tokens, metric, mask), atol) > 20
    return graph


CASES = [
    dict(arch="gpt2", seed=0),
    dict(arch="gpt2", seed=1, d_model=12, n_heads=3, d_head=4, n_layers=3),  # d_model not divisible by 8
    dict(arch="gpt2", seed=2, d_model=6, n_heads=2, d_head=3, d_mlp=10),
    dict(arch="llama", seed=0),
    dict(arch="llama", seed=1, d_model=12, n_heads=4, d_head=2, n_key_value_heads=2),  # 2 queries per kv head
    dict(arch="llama", seed=2, d_model=10, n_heads=2, d_head=4, n_key_value_heads=2),  # plain multi-head
    dict(arch="llama", seed=3, n_heads=4, d_head=4, rotary_adjacent_pairs=True, n_layers=3),
    dict(arch="llama", seed=4, n_heads=4, d_head=6, rotary_dim=4),  # partial rotary
    dict(arch="gpt2", seed=5, act_fn="gelu_fast", normalization_type="LNPre"),  # norms without weights
    dict(arch="llama", seed=6, act_fn="relu", normalization_type="RMSPre"),  # ReGLU
    dict(arch="gpt2", seed=7, act_fn="relu2", scale_attn_by_inverse_layer_idx=True),
    dict(arch="solu", seed=8, normalization_type="LNPre"),  # SoLU as from_pretrained folds it
    dict(arch="pythia", seed=9, normalization_type="LNPre", n_heads=2, d_head=8),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_real_equals_autograd_float64(case):
    case = dict(case)
    model = tiny_model(case.pop("arch"), dtype=torch.float64, **case)
    generator = torch.Generator().manual_seed(case["seed"])
    tokens = torch.randint(0, model.cfg.d_vocab, (3, 7), generator=generator)
    metric = logit_diff(torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6]))
    assert_real_matches_autograd(model, tokens, metric)
    assert no_hooks_left(model)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_real_equals_autograd_with_padding_and_logprob_metric(arch):
    model = tiny_model(arch, dtype=torch.float64, seed=5)
    tokens = torch.tensor([[3, 4, 5, 6, 7], [8, 9, 10, 0, 0], [11, 12, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    metric = logprob_diff(torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6]))
    graph = assert_real_matches_autograd(model, tokens, metric, mask)
    # padded positions carry nothing: zero gradient and zero flow there
    values = backprop(graph, Real)
    assert values["hook_embed"][0][1, 3:].abs().max() == 0 and values["hook_embed"][0][2, 2:].abs().max() == 0
    flow = gradgraph.gradient_flow(graph)
    assert flow["blocks.0.hook_resid_pre"][2, 2:].abs().max() == 0


def test_each_batch_item_matches_its_unpadded_run():
    model = tiny_model("llama", dtype=torch.float64, seed=6)
    tokens = torch.tensor([[3, 4, 5, 6], [8, 9, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    batched = backprop(build_graph(model, tokens, logit_diff(1, 2), attention_mask=mask), Log)
    alone = backprop(build_graph(model, tokens[1:, :2], logit_diff(1, 2)), Log)
    assert torch.allclose(batched["hook_embed"][:, 1, :2], alone["hook_embed"][:, 0], atol=1e-10)


@pytest.mark.real
def test_real_equals_autograd_on_smollm2(smol_model):
    """float32 on the embedded model, SVA prompts: error below 1e-4 (relative to the node's largest
    gradient, when that exceeds 1) at every hook point."""
    tokens, mask = gradgraph.prompts.to_tokens(smol_model, ["The keys to the cabinet", "The author that the guards like"])
    metric = logit_diff(359, 314)
    graph = build_graph(smol_model, tokens, metric, attention_mask=mask)
    values = backprop(graph, Real)
    reference = autograd_gradients(smol_model, tokens, metric, mask)
    assert compare_with_autograd(graph, values, reference, 1e-4) > 500
    assert no_hooks_left(smol_model)


@pytest.mark.real
def test_a_long_prompts_chunked_passes_equal_autograd_on_smollm2(smol_model):
    """300 tokens and a shorter padded row: the graph recomputes its patterns and a pass that keeps
    what lies outside attention goes through it in chunks; every hook point there equals autograd."""
    from gradgraph.data import sva_items

    text = ". ".join(i.prefix + i.good for i in sva_items(smol_model.tokenizer)[:60])
    ids = gradgraph.prompts.to_tokens(smol_model, text)[0][0, :300]
    tokens = torch.stack([ids, ids.roll(7)])
    mask = torch.ones_like(tokens)
    mask[1, 260:] = 0
    metric = logit_diff(359, 314)
    graph = build_graph(smol_model, tokens * mask, metric, attention_mask=mask)
    assert len(graph.regions) == smol_model.cfg.n_layers and graph.regions[0].rows < 300
    inside = {n for region in graph.regions for n in region.inner}
    outside = [n for n in graph.order if n not in inside]
    values = backprop(graph, Real, keep=outside)
    reference = {n: g for n, g in autograd_gradients(smol_model, tokens * mask, metric, mask).items() if n not in inside}
    assert compare_with_autograd(graph, values, reference, 1e-4) > 500
    assert no_hooks_left(smol_model)


def _tiny_graph(arch="gpt2", batch=2):
    d_head = 1 if arch == "gpt2" else 2
    model = tiny_model(arch, n_layers=1, d_model=2, n_heads=1, d_head=d_head, d_mlp=2, d_vocab=8,
                       dtype=torch.float64, seed=3)
    tokens = torch.tensor([[1, 2], [4, 0]])[:batch]
    mask = torch.tensor([[1, 1], [1, 0]])[:batch]
    return build_graph(model, tokens, logit_diff(torch.tensor([1, 2])[:batch], torch.tensor([3, 4])[:batch]),
                       attention_mask=mask)


def _all_paths(graph, scalar, b):
    sources = [n for n in scalar.nodes if n != "metric" and n[0] in graph.sources and n[1][0] == b]
    out = []
    for source in sources:
        for path in nx.all_simple_paths(scalar, source, "metric"):
            out.append((math.prod(scalar[u][v]["weight"] for u, v in zip(path, path[1:])), path[:-1]))
    return out


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_top_paths_and_entropy_equal_brute_force(arch):
    graph = _tiny_graph(arch)
    scalar = graph.to_networkx()
    found = gradgraph.top_paths(graph, k=4)
    entropy = gradgraph.path_entropy(graph)
    for b in range(2):
        paths = _all_paths(graph, scalar, b)
        assert 1000 < len(paths) < 200_000
        best = sorted((abs(w) for w, _ in paths), reverse=True)[:4]
        assert [p.magnitude for p in found[b]] == pytest.approx(best, rel=1e-12)
        for path in found[b]:  # each is a real path with the stated signed weight
            nodes = list(path.nodes)
            assert nodes[0][0] in graph.sources and nodes[-1] == ("metric", (b,))
            assert math.prod(scalar[u][v]["weight"] for u, v in zip(nodes, nodes[1:])) == pytest.approx(path.weight)
        z = sum(abs(w) for w, _ in paths)
        r = sum(abs(w) * math.log(abs(w)) for w, _ in paths)
        assert entropy[b].item() == pytest.approx(math.log(z) - r / z, rel=1e-10)
        assert gradgraph.paths.path_count(graph)[b].item() == pytest.approx(math.log(len(paths)), rel=1e-12)
        assert gradgraph.paths.normalised_entropy(graph)[b].item() == pytest.approx(
            (math.log(z) - r / z) / math.log(len(paths)), rel=1e-10)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_top_paths_from_chosen_sources_equal_brute_force(arch):
    """Paths restricted to start at some positions: the best of those in the full enumeration."""
    from gradgraph.components import component_path, top_component_paths

    graph = _tiny_graph(arch)
    scalar = graph.to_networkx()
    for sources, start in ((0, [0, 0]), (torch.tensor([1, 0]), [1, 0]), ([[0], [0]], [0, 0]), (-1, [1, 0])):
        found = gradgraph.top_paths(graph, k=3, sources=sources)
        for b in range(2):
            paths = [(w, p) for w, p in _all_paths(graph, scalar, b) if p[0][1][1] == start[b]]
            best = sorted((abs(w) for w, _ in paths), reverse=True)[:3]
            assert [p.magnitude for p in found[b]] == pytest.approx(best, rel=1e-12), (sources, b)
            assert all(p.nodes[0][1][1] == start[b] for p in found[b])
    # component level: collapsed from the same restricted search
    comp = top_component_paths(graph, k=2, sources=0)
    assert all(path[0] == "embed@0" for path, _, _ in comp[0])
    ranked = gradgraph.top_paths(graph, k=16, sources=0)[0]
    assert comp[0][0][1] == pytest.approx(ranked[0].weight) and comp[0][0][0] == component_path(graph, ranked[0].nodes)
    with pytest.raises(GradGraphError, match="outside"):
        gradgraph.top_paths(graph, k=1, sources=5)
    with pytest.raises(GradGraphError, match="one position per item"):
        gradgraph.top_paths(graph, k=1, sources=torch.tensor([0, 0, 0]))


def test_gradient_flow_is_forward_times_backward():
    graph = _tiny_graph("llama")
    flow = gradgraph.gradient_flow(graph)
    total = backprop(graph, Abs, dtype=torch.float64)
    # at an input element (forward value one) the flow is its backward value
    assert torch.allclose(flow["hook_embed"], total["hook_embed"][0])
    # at the metric it is the sum over every input→metric path
    z = torch.stack([total["hook_embed"][0][b].sum() for b in range(2)])
    assert torch.allclose(flow["metric"], z)


def test_networkx_limit_and_index_convention():
    graph = _tiny_graph("gpt2", batch=1)
    scalar = graph.to_networkx()
    assert scalar.number_of_edges() == graph.n_scalar_edges() + 1
    assert (names.name("logits"), (0, 1, 1)) in scalar  # logits indexed by vocabulary id
    big = build_graph(tiny_model("gpt2"), torch.randint(0, 50, (2, 10)), logit_diff(1, 2))
    with pytest.raises(GradGraphError, match=r"edges, over the to_networkx limit of 200,000"):
        big.to_networkx()


# ----------------------------------------------------------------------------- bad inputs


def _raises_and_clean(model, match, fn):
    with pytest.raises(GradGraphError, match=match):
        fn()
    assert no_hooks_left(model)


def test_bad_inputs_raise_and_leave_no_hook():
    model = tiny_model("llama", n_ctx=8)
    tokens = torch.randint(0, 50, (2, 5))
    _raises_and_clean(model, "one value per prompt", lambda: build_graph(model, tokens, lambda logits, mask: logits.sum()))
    _raises_and_clean(model, "longer than the model's context", lambda: build_graph(model, torch.zeros(1, 9, dtype=torch.long), logit_diff(1, 2)))
    _raises_and_clean(model, "non-empty", lambda: build_graph(model, torch.zeros(0, 4, dtype=torch.long), logit_diff(1, 2)))
    _raises_and_clean(model, "metric must be a function", lambda: build_graph(model, tokens, "logit_diff"))
    _raises_and_clean(model, "right padding", lambda: build_graph(model, tokens, logit_diff(1, 2),
                                                                  attention_mask=torch.tensor([[0, 1, 1, 1, 1]] * 2)))
    _raises_and_clean(model, "outside prompt", lambda: build_graph(model, tokens, logit_diff(1, 2, pos=7)))

    def failing_metric(logits, mask):
        raise GradGraphError("metric failed on purpose")

    _raises_and_clean(model, "on purpose", lambda: build_graph(model, tokens, failing_metric))
    graph = build_graph(model, tokens, logit_diff(1, 2))
    with pytest.raises(GradGraphError, match="k >= 1"):
        gradgraph.top_paths(graph, k=0)
    with pytest.raises(GradGraphError, match="k >= 1"):
        KMax(0)
    with pytest.raises(GradGraphError, match="semiring must be one of"):
        backprop(graph, "Max")
    with pytest.raises(GradGraphError, match="granularity"):
        backprop(graph, Real, granularity="layer")


@pytest.mark.parametrize(
    "overrides, feature",
    [
        (dict(positional_embedding_type="alibi"), "positional_embedding_type='alibi'"),
        (dict(use_logn_attn=True), "log-n attention scaling"),
        (dict(clip_qkv=4.0), "q/k/v clipping"),
    ],
)
def test_unsupported_architectures_are_named(overrides, feature):
    model = tiny_model("gpt2", **overrides)
    _raises_and_clean(model, feature, lambda: build_graph(model, torch.randint(0, 50, (1, 4)), logit_diff(1, 2)))


def test_flags_must_be_on():
    model = tiny_model("gpt2")
    model.set_use_split_qkv_input(False)
    _raises_and_clean(model, "set_use_split_qkv_input", lambda: build_graph(model, torch.randint(0, 50, (1, 4)), logit_diff(1, 2)))


def test_non_finite_activations_are_reported():
    model = tiny_model("gpt2")
    with torch.no_grad():
        model.blocks[0].attn.W_V[0, 0, 0] = float("nan")
    _raises_and_clean(model, "non-finite activations", lambda: build_graph(model, torch.randint(0, 50, (1, 4)), logit_diff(1, 2)))


def test_overflow_is_reported_not_propagated():
    """A metric scaled to 1e37 makes Σ Π|w| pass float32's range: Abs raises, Log (logs) copes."""
    model = tiny_model("gpt2", dtype=torch.float32, n_layers=3)
    graph = build_graph(model, torch.randint(0, 50, (1, 6)), lambda logits, mask: 1e37 * (logits[:, -1, 1] - logits[:, -1, 2]))
    with pytest.raises(GradGraphError, match="overflowed torch.float32.*dtype=torch.float64"):
        backprop(graph, Abs)
    assert torch.isfinite(backprop(graph, Abs, dtype=torch.float64)["hook_embed"]).all()
    log_values = backprop(graph, Log)["hook_embed"]
    assert torch.isfinite(log_values).all() and log_values.max() > math.log(3.4e38)
