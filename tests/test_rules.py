"""The builder's seams: rule sets over one recording, the structured softmax block against its dense
Jacobian for every semiring, tagged immutable graphs, input embeddings, memory checks, caches."""

import dataclasses
import math

import pytest
import torch

from gradgraph import GRADIENT, GradGraphError, assemble, backprop, build_graph, forward, record, tiny_model
from gradgraph.arch import hooks, names
from gradgraph.arch.models import FAMILIES
from gradgraph.arch import memory, recorded
from gradgraph.graph import OPS, GradGraph, Matmul, Rank1
from gradgraph.metrics import logit_diff, logprob_diff
from gradgraph.rules import SoftmaxOp
from gradgraph.semirings import Abs, Entropy, KMax, Log, Max, Real, SignedMax
from gradgraph.weights import Weight

from conftest import no_hooks_left
from test_graph import autograd_gradients, compare_with_autograd
from test_families import family_model

F64 = torch.float64
SEMIRINGS = [Real, Abs, Log, Max, SignedMax, KMax(3), Entropy]


def dense_softmax(op: SoftmaxOp) -> list:
    """The softmax block as the first builder stored it: one dense [k, k'] Jacobian per score row."""
    p = op.p * op.allowed
    B, H, P, _ = p.shape
    jac = torch.diag_embed(p) - p[..., :, None] * p[..., None, :]  # [B, H, q, k, k']
    return [Matmul(op.scores, op.pattern, "softmax", op.layer, Weight(jac.reshape(-1, P, P)), True,
                   "b h q k -> (b h q) 1 k", "b h q k -> (b h q) 1 k", dict(b=B, h=H, q=P))]


DENSE = dataclasses.replace(GRADIENT, name="gradient, dense softmax", softmax=dense_softmax)


def random_values(sr, shape, seed, spread=2.0):
    """Valid semiring values: ⊕ of two converted random weights, some elements without a path."""
    gen = torch.Generator().manual_seed(seed)
    out = sr.zero(shape, dtype=F64, device="cpu")
    for _ in range(2):
        raw = torch.randn(shape, generator=gen, dtype=F64) * spread
        raw[torch.rand(shape, generator=gen) < 0.2] = 0.0
        out = sr.plus(out, sr.convert(raw))
    return out


def softmax_blocks(spread=1.0):
    """A structured and a dense softmax block over a causal, padded [2, 3, 5, 5] pattern."""
    gen = torch.Generator().manual_seed(0)
    B, H, P = 2, 3, 5
    valid = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    causal = torch.tril(torch.ones(P, P, dtype=torch.bool))
    allowed = causal[None, None] & valid[:, None, :, None] & valid[:, None, None, :]
    scores = torch.randn(B, H, P, P, generator=gen, dtype=F64) * 3 * spread
    p = torch.softmax(scores.masked_fill(~causal, -math.inf), -1)  # padded query rows keep real values
    op = SoftmaxOp("s", "p", p, allowed, 0)
    (structured,) = GRADIENT.softmax(op)
    (dense,) = dense_softmax(op)
    return structured, dense, (B, H, P, P)


@pytest.mark.parametrize("sr", SEMIRINGS, ids=lambda s: s.name)
@pytest.mark.parametrize("granularity", ["neuron", "op"])
def test_structured_softmax_equals_dense_jacobian(sr, granularity):
    structured, dense, shape = softmax_blocks()
    assert isinstance(structured, Rank1)
    inner = sr.within_op() if granularity == "op" else sr
    for seed in range(3):
        values = random_values(sr, shape, seed)
        for direction in ("backward", "forward"):
            got = getattr(structured, direction)(inner, values)
            want = getattr(dense, direction)(inner, values)
            assert got.shape == want.shape
            assert torch.allclose(got, want, rtol=1e-10, atol=1e-12), (direction, (got - want).abs().max())
    # the same scalar edges: masked keys and padded query rows have none
    shapes = {"s": shape, "p": shape}
    edges = lambda block: sorted(zip(*(t.tolist() for t in block.scalar_edges(shapes))))  # noqa: E731
    assert [e[:2] for e in edges(structured)] == [e[:2] for e in edges(dense)]
    assert torch.allclose(torch.tensor([e[2] for e in edges(structured)]), torch.tensor([e[2] for e in edges(dense)]))
    assert structured.n_edges(shapes) == len(edges(dense))
    for flat in (0, 7, 53, 140):
        targets, weights = structured.out_edges(shapes, flat)
        assert sorted(targets.tolist()) == sorted(t for s, t, _ in edges(dense) if s == flat)


@pytest.mark.parametrize("sr", [Entropy, Log, Max, Abs], ids=lambda s: s.name)
def test_structured_softmax_survives_values_far_apart(sr):
    """Values 1,000 nats apart (deep graphs): each output equals an explicit ⊕ over scalar edges."""
    structured, dense, shape = softmax_blocks()
    values = random_values(sr, shape, 5)
    if sr in (Entropy, Log):
        values[0] = values[0] + torch.randint(-1, 2, shape, generator=torch.Generator().manual_seed(1)) * 1000.0
    got = structured.backward(sr, values)
    jac = dense.weight.real(F64).reshape(shape + (shape[-1],))  # [b, h, q, k, k']
    for b, h, q in [(0, 0, 4), (0, 2, 3), (1, 1, 2), (1, 2, 4)]:
        for k in range(shape[-1]):
            total = sr.zero((), dtype=F64, device="cpu")
            for k2 in range(shape[-1]):
                w = jac[b, h, q, k, k2]
                if w != 0:
                    total = sr.plus(total, sr.times(sr.convert(w), values[:, b, h, q, k2]))
            assert torch.allclose(got[:, b, h, q, k], total, rtol=1e-10, atol=1e-12), (b, h, q, k)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_one_recording_assembles_under_two_rule_sets(arch):
    """A recording is assembled twice: with the structured softmax and with the dense Jacobian the
    first builder stored; the graphs agree for every semiring and the recording is left unchanged."""
    kw = dict(n_heads=4, n_key_value_heads=2) if arch == "llama" else {}
    model = tiny_model(arch, dtype=F64, seed=11, n_layers=2, **kw)
    tokens = torch.tensor([[3, 4, 5, 6, 7], [8, 9, 10, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    metric = logprob_diff(torch.tensor([1, 2]), torch.tensor([3, 4]))
    rec = record(model, tokens, metric, attention_mask=mask)
    before = {name: tensor.clone() for name, tensor in rec.activations.items()}
    structured, dense = assemble(rec, GRADIENT), assemble(rec, DENSE)
    assert structured.rules == "gradient" and dense.rules == "gradient, dense softmax"
    assert structured.order == dense.order and len(structured.edges) == len(dense.edges)
    assert compare_with_autograd(structured, backprop(structured, Real),
                                 autograd_gradients(model, tokens, metric, mask), 1e-10) > 20
    for sr in SEMIRINGS:
        for direction in (backprop, forward):
            a, b = direction(structured, sr), direction(dense, sr)
            for node in structured.order:
                assert torch.allclose(a[node], b[node], rtol=1e-9, atol=1e-12), (sr.name, direction.__name__, node)
    assert all(torch.equal(before[name], rec.activations[name]) for name in before)


def test_graph_is_immutable_and_indexes_its_blocks():
    model = tiny_model("llama", dtype=F64, n_layers=2, seed=2)
    graph = build_graph(model, torch.tensor([[1, 2, 3, 4]]), logit_diff(1, 2))
    with pytest.raises(dataclasses.FrozenInstanceError):
        graph.edges = ()
    with pytest.raises(TypeError):
        graph.shapes["x"] = (1,)
    with pytest.raises(TypeError):
        graph.activations["hook_embed"] = None
    assert isinstance(graph.edges, tuple) and isinstance(graph, GradGraph)
    for node in graph.order:
        assert graph.edges_from(node) == tuple(e for e in graph.edges if e.src == node)
        assert graph.edges_into(node) == tuple(e for e in graph.edges if e.tgt == node)
    with pytest.raises(GradGraphError, match="blocks from"):
        graph.edge("hook_embed", "metric")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_blocks_carry_their_op_and_layer(arch):
    model = tiny_model(arch, dtype=F64, n_layers=3, seed=4)
    graph = build_graph(model, torch.tensor([[1, 2, 3, 4]]), logit_diff(1, 2))
    expected_op = {"hook_attn_scores": "bilinear", "hook_z": "bilinear", "hook_pattern": "softmax",
                   "hook_q": "linear", "hook_attn_out": "linear", "hook_mlp_out": "linear", "hook_post": "activation",
                   "hook_resid_mid": "residual", "hook_resid_post": "residual", "hook_q_input": "copy",
                   "hook_rot_q": "rotary", "metric": "metric"}
    seen = set()
    for edge in graph.edges:
        assert edge.op in OPS
        if edge.src in graph.sources:  # the embeddings' sum lies outside the layers
            assert edge.layer is None and edge.op == "residual", edge
        elif edge.tgt.startswith("blocks."):
            layer = int(edge.tgt.split(".")[1])
            # the copy from one layer's resid_post to the next layer's resid_pre belongs to the earlier layer
            assert edge.layer == (layer - 1 if edge.src.endswith("hook_resid_post") else layer), edge
        else:
            assert edge.layer is None, edge
        short = edge.tgt.split(".")[-1].split(":")[0]
        if short in expected_op:
            assert edge.op == expected_op[short], edge
            seen.add(short)
        if ".ln" in edge.tgt:
            assert edge.op == "norm", edge
    assert seen == set(expected_op) - ({"hook_rot_q"} if arch == "gpt2" else set())


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_input_embeddings_replace_the_tokens(arch):
    model = tiny_model(arch, dtype=F64, seed=5)
    tokens = torch.tensor([[3, 4, 5, 6], [7, 8, 9, 10]])
    metric = logit_diff(1, 2)
    plain = build_graph(model, tokens, metric)
    same = build_graph(model, tokens, metric, embed=model.W_E[tokens])
    assert torch.equal(plain.metric_value, same.metric_value)
    embed = 0.5 * model.W_E[tokens] + 0.1  # e.g. a point on an integrated-gradients path
    graph = build_graph(model, tokens, metric, embed=embed)
    assert not torch.allclose(graph.metric_value, plain.metric_value)
    assert torch.equal(graph.activations["hook_embed"], embed)
    with hooks.replacing(model, {"hook_embed": embed}):  # autograd at the replaced embeddings
        reference = autograd_gradients(model, tokens, metric)
    assert compare_with_autograd(graph, backprop(graph, Real), reference, 1e-10) > 20
    with pytest.raises(GradGraphError, match=r"embed must be a \[batch, pos, d_model\]"):
        build_graph(model, tokens, metric, embed=embed[:, :2])
    assert no_hooks_left(model)


def test_memory_is_checked_before_the_forward_pass(monkeypatch):
    model = tiny_model("gpt2")
    calls = []
    original = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    from_weights = recorded.recorded  # the recording forward of the GPT-2 / Llama layout
    monkeypatch.setattr(recorded, "recorded", lambda *a, **k: calls.append(1) or from_weights(*a, **k))
    tokens = torch.randint(0, 50, (4, 16))
    need = memory.graph_bytes(model.cfg, 4, 16, torch.float32, logit_rows=4)  # logit_diff reads one position a row
    assert need < memory.graph_bytes(model.cfg, 4, 16, torch.float32)  # whose logits alone are made
    monkeypatch.setattr(memory, "available_bytes", lambda device: need - 1)
    with pytest.raises(GradGraphError, match=r"needs about .* GiB .* available .* fewer tokens .* smaller batch"):
        build_graph(model, tokens, logit_diff(1, 2))
    assert not calls and no_hooks_left(model)
    monkeypatch.setattr(memory, "available_bytes", lambda device: need)
    build_graph(model, tokens, logit_diff(1, 2))
    assert calls


def test_memory_estimate_grows_with_positions_squared():
    model = tiny_model("llama")
    one = memory.graph_bytes(model.cfg, 1, 1024, torch.float32)
    assert memory.graph_bytes(model.cfg, 2, 1024, torch.float32) == pytest.approx(2 * one, rel=1e-6)
    assert memory.graph_bytes(model.cfg, 1, 1024, torch.float64) == pytest.approx(2 * one, rel=1e-6)
    quadratic = memory.graph_bytes(model.cfg, 1, 4096, torch.float32) / one
    assert 4 < quadratic < 16


@pytest.mark.real
def test_an_over_large_graph_is_refused_on_the_embedded_model(smol_model):
    tokens = torch.zeros(64, 2048, dtype=torch.long)
    with pytest.raises(GradGraphError, match="needs about"):
        build_graph(smol_model, tokens, logit_diff(359, 314))
    assert no_hooks_left(smol_model)
    # what the benchmark runs fits on a 24 GB machine
    assert memory.graph_bytes(smol_model.cfg, 1, 1024, torch.float32) < 12 * 2**30


def test_keep_returns_only_those_nodes_with_the_same_values():
    model = tiny_model("llama", dtype=F64, n_layers=2, seed=6)
    graph = build_graph(model, torch.tensor([[1, 2, 3, 4, 5]]), logit_diff(1, 2))
    for direction in (backprop, forward):
        full = direction(graph, Entropy)
        kept = direction(graph, Entropy, keep=["hook_embed", "blocks.1.attn.hook_z"])
        assert set(kept) == {"hook_embed", "blocks.1.attn.hook_z"}
        # (keeping fewer nodes, a pass goes through each norm on per-head copies once: sums in another order)
        assert all(torch.allclose(kept[n], full[n], rtol=1e-12, atol=1e-14) for n in kept)
    with pytest.raises(GradGraphError, match="keep names nodes"):
        backprop(graph, Real, keep=["no.such.node"])


def test_cached_weights_follow_the_model():
    """Shared weights are cached per model; an edited parameter is picked up, not served stale."""
    model = tiny_model("gpt2", dtype=F64, seed=7)
    tokens = torch.tensor([[1, 2, 3, 4]])
    metric = logit_diff(1, 2)
    first = build_graph(model, tokens, metric)
    second = build_graph(model, tokens, metric)
    w_first = first.edge("blocks.0.mlp.hook_post", "blocks.0.hook_mlp_out").weight
    assert w_first is second.edge("blocks.0.mlp.hook_post", "blocks.0.hook_mlp_out").weight
    assert w_first.abs(F64) is w_first.abs(F64)  # |W| computed once
    with torch.no_grad():
        model.blocks[0].mlp.W_out.mul_(1.5)
    graph = build_graph(model, tokens, metric)
    assert graph.edge("blocks.0.mlp.hook_post", "blocks.0.hook_mlp_out").weight is not w_first
    assert compare_with_autograd(graph, backprop(graph, Real), autograd_gradients(model, tokens, metric), 1e-10) > 20


@pytest.mark.parametrize("family", FAMILIES)
def test_an_unpadded_patterns_masked_pairs_are_exact_zeros(family):
    """The softmax's Jacobian of a batch without padding is formed from p itself (``SoftmaxOp.exact``):
    that holds only if p is exactly 0 at every pair ``allowed`` leaves out, on every family."""
    model = family_model(family, n_layers=2, seed=2)
    tokens = torch.randint(1, 40, (2, 6), generator=torch.Generator().manual_seed(0))
    graph = build_graph(model, tokens, lambda logits: logits[:, -1, 1] - logits[:, -1, 2])
    blocks = [b for b in graph.edges if isinstance(b, Rank1) and b.tgt.endswith("hook_pattern")]
    assert blocks and all(len(b.a.factors) == 1 for b in blocks)
    for block in blocks:
        p = block.a.real(torch.float64)
        allowed = next(m for m in graph.edges if isinstance(m, Matmul) and m.layer == block.layer
                       and m.op == "bilinear" and m.tgt_mask is not None).tgt_mask
        assert (p.masked_select(~allowed.expand_as(p)) == 0).all(), (family, block.layer)
        assert not allowed.all() or names.is_encoder(model.cfg)


def test_a_nonnegative_weight_is_its_own_magnitude_and_a_factor_one_changes_nothing():
    p = torch.softmax(torch.randn(2, 5, 5, dtype=torch.float64), -1)
    half, one = Weight(p, 0.5, nonnegative=True), Weight(p, 1.0, nonnegative=True)
    assert torch.equal(one.real(torch.float64), p) and torch.equal(half.abs(torch.float32), (p * 0.5).float())
    assert torch.equal(Weight(p, 1.0).abs(torch.float64), p.abs())
    signed = Weight(p - 0.2, -1.0)  # not marked: its magnitude is taken
    assert torch.equal(signed.abs(torch.float64), (0.2 - p).abs())
