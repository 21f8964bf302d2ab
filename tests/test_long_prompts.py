"""Long prompts: a graph that recomputes each layer's scores and pattern from its queries and keys
whenever a pass reads them (``patterns="recompute"``, what ``"auto"`` picks past the memory budget)
holds the same values as one that keeps them, under every semiring and rule set, on every family,
whether a pass forms a layer's patterns whole or goes through its attention a chunk of query rows
at a time (``gradgraph.chunked``); it keeps no pattern, and the memory estimate counts what it holds."""

import pytest
import torch

from gradgraph import GradGraphError, backprop, chunked, tiny_model
from gradgraph.arch import memory, names
from gradgraph.arch.models import FAMILIES
from gradgraph.backprop import through
from gradgraph.build import assemble, build_graph, record
from gradgraph.paths import top_paths
from gradgraph.semirings import Abs, Entropy, KMax, Log, Max, Real

from conftest import no_hooks_left
from test_families import family_model, prompts


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    """Equal up to ``tol`` of the largest magnitude (−inf where both are −inf)."""
    both = torch.isinf(a) & torch.isinf(b) & (a == b)
    a, b = torch.where(both, 0, a), torch.where(both, 0, b)
    return bool(((a - b).abs() <= tol * a.abs().max().clamp(min=1e-300)).all())


def _pair(family: str, **kw):
    model = family_model(family, n_layers=2, seed=5)
    tokens, mask, metric = prompts(family)
    kept = record(model, tokens, metric, attention_mask=mask, patterns="keep", **kw)
    formed = record(model, tokens, metric, attention_mask=mask, patterns="recompute", **kw)
    return model, kept, formed


@pytest.mark.parametrize("family", list(FAMILIES))
def test_recomputed_patterns_give_the_same_graph_on_every_family(family):
    model, kept, formed = _pair(family)
    patterns = [names.name(k, layer) for k in ("attn_scores", "pattern") for layer in range(2)]
    assert all(p in kept.activations and p not in formed.activations for p in patterns)
    for rules, semirings in (("gradient", (Real, Abs, Max, Entropy)), ("attn-lrp", (Real,)), ("cp-lrp", (Real,)),
                             ("chefer2021", (Real,))):
        one, two = assemble(kept, rules), assemble(formed, rules)
        assert one.shapes == two.shapes and len(one.edges) == len(two.edges)
        assert all(two.activations.formed_on_read(p) for p in patterns)
        for node in patterns:  # the tensors the forward pass made, formed again
            assert _close(one.activations[node], two.activations[node], 1e-12), (family, node)
        for sr in semirings:
            a, b = backprop(one, sr), backprop(two, sr)
            # the gradient at a norm's scale cancels to ~1e-16 of its terms: compared against the largest value
            scale = max(float(v.abs().nan_to_num(0).max()) for v in a.values() if v.numel())
            for node in a:
                diff = (a[node] - b[node]).nan_to_num(0).abs().max() if a[node].numel() else 0
                assert diff <= 1e-10 * max(scale, 1.0), (family, rules, sr.name, node, float(diff))
    assert no_hooks_left(model)


def _chunks_counted(monkeypatch, rows_of: int) -> list:
    """Chunks of ``rows_of`` query rows (for 3 prompts × 4 heads × 7 keys), each one counted."""
    monkeypatch.setattr(memory, "CHUNK_ELEMENTS", rows_of * 3 * 4 * 7)
    monkeypatch.setattr(memory, "CHUNK_ROWS", 1)
    counted, chunks = [], chunked.Region._chunks

    def counting(region):
        for chunk in chunks(region):
            counted.append(chunk[0])
            yield chunk

    monkeypatch.setattr(chunked.Region, "_chunks", counting)
    return counted


@pytest.mark.parametrize("family", list(FAMILIES))
def test_passes_a_chunk_of_query_rows_at_a_time_equal_the_whole_attention(family, monkeypatch):
    counted = _chunks_counted(monkeypatch, 2)
    model, kept, formed = _pair(family)
    for rules, semirings in (("gradient", (Real, Abs, Max, Entropy, KMax(2))), ("attn-lrp", (Real, Max)),
                             ("cp-lrp", (Real,)), ("chefer2021", (Real,)), ("relp", (Real, Entropy))):
        one, two = assemble(kept, rules), assemble(formed, rules)
        assert not one.regions and [r.layer for r in two.regions] == [0, 1] and all(r.rows == 2 for r in two.regions)
        inside = {n for region in two.regions for n in region.inner}
        outside = [n for n in two.order if n not in inside]
        for sr in semirings:
            counted.clear()
            a, b = backprop(one, sr, keep=outside), backprop(two, sr, keep=outside)
            assert len(counted) == 2 * 4, (family, rules)  # 7 rows in chunks of 2, in each of 2 layers
            scale = max(float(v.abs().nan_to_num(0).max()) for v in a.values() if v.numel())
            for node in outside:
                diff = (a[node] - b[node]).nan_to_num(0).abs().max() if a[node].numel() else 0
                assert diff <= 1e-10 * max(scale, 1.0), (family, rules, sr.name, node, float(diff))
    # forward and through go chunk by chunk too; op granularity sums within each block across chunks
    one, two = assemble(kept), assemble(formed)
    for sr, granularity in ((Log, "neuron"), (Max, "op"), (KMax(3), "neuron")):
        counted.clear()
        a = through(one, sr, granularity=granularity, keep=one.sources)
        b = through(two, sr, granularity=granularity, keep=two.sources)
        assert len(counted) == 2 * 2 * 4 and all(_close(a[n], b[n], 1e-12) for n in a), (family, sr.name)
    assert no_hooks_left(model)


def test_a_pass_that_keeps_a_pattern_forms_it_whole(monkeypatch):
    counted = _chunks_counted(monkeypatch, 2)
    _, kept, formed = _pair("gpt2")
    one, two = assemble(kept), assemble(formed)
    node = names.name("pattern", 1)
    a, b = backprop(one, Max, keep=[node, *one.sources]), backprop(two, Max, keep=[node, *two.sources])
    assert not counted and all(_close(a[n], b[n], 1e-12) for n in a)


def test_a_causal_chunk_reads_the_keys_up_to_its_last_row(monkeypatch):
    _chunks_counted(monkeypatch, 3)
    model = tiny_model("llama", dtype=torch.float64, n_layers=1, n_heads=4, seed=2)
    tokens = torch.randint(1, 50, (3, 7))
    from gradgraph.metrics import logit_diff

    region = build_graph(model, tokens, logit_diff(1, 2), patterns="recompute").regions[0]
    spans = [(rows.start, rows.stop, keys) for rows, keys, _ in region._chunks()]
    assert spans == [(0, 3, 3), (3, 6, 6), (6, 7, 7)]


@pytest.mark.parametrize("sr", [Log, KMax(3)], ids=lambda s: s.name)
def test_forward_through_and_top_paths_agree(sr):
    _, kept, formed = _pair("llama")
    one, two = assemble(kept), assemble(formed)
    a, b = through(one, sr, keep=one.sources), through(two, sr, keep=two.sources)
    assert all(_close(a[n], b[n], 1e-12) for n in a)
    paths = [[(p.weight, p.nodes) for item in top_paths(g, 3) for p in item] for g in (one, two)]
    assert len(paths[0]) == 3 * one.batch_size
    assert [n for _, n in paths[0]] == [n for _, n in paths[1]]
    assert all(abs(x - y) <= 1e-12 * abs(x) for (x, _), (y, _) in zip(*paths))


def test_a_prefix_graph_recomputes_its_patterns_with_the_cached_keys(monkeypatch):
    counted = _chunks_counted(monkeypatch, 0)  # a row per chunk
    model = tiny_model("llama", dtype=torch.float64, n_layers=2, seed=4)
    prefix = torch.tensor([3, 9, 4, 7])
    tokens = torch.tensor([[5, 6, 8], [2, 11, 12]])
    from gradgraph.metrics import logit_diff

    graphs = [build_graph(model, tokens, logit_diff(1, 2), prefix=prefix, patterns=p) for p in ("keep", "recompute")]
    a, b = (backprop(g, Max, keep=g.sources + g.cached) for g in graphs)
    assert all(_close(a[n], b[n], 1e-12) for n in a) and len(counted) == 2 * 3  # a chunk per row and layer
    node = names.name("pattern", 1)
    assert graphs[0].shapes[node] == graphs[1].shapes[node] == (2, model.cfg.n_heads, 3, 7)
    assert _close(graphs[0].activations[node], graphs[1].activations[node], 1e-12)


def test_auto_recomputes_past_the_budget(monkeypatch):
    model = tiny_model("gpt2", n_layers=2)
    tokens = torch.randint(0, 50, (2, 6))
    from gradgraph.metrics import logit_diff

    node = names.name("pattern", 0)
    assert not build_graph(model, tokens, logit_diff(1, 2)).activations.formed_on_read(node)
    monkeypatch.setattr(memory, "PATTERN_BUDGET", memory.pattern_bytes(model.cfg, 2, 6, torch.float32) - 1)
    assert build_graph(model, tokens, logit_diff(1, 2)).activations.formed_on_read(node)
    with pytest.raises(GradGraphError, match="patterns must be one of"):
        build_graph(model, tokens, logit_diff(1, 2), patterns="lazy")
    assert no_hooks_left(model)


def test_the_estimate_of_a_recomputing_graph_grows_slower_and_admits_it(monkeypatch):
    model = tiny_model("llama", n_layers=8)
    kept, formed = (memory.graph_bytes(model.cfg, 1, 4096, torch.float32, recompute=r) for r in (False, True))
    assert formed < kept / 2
    one, two, three = (memory.graph_bytes(model.cfg, b, 4096, torch.float32, recompute=True) for b in (1, 2, 3))
    assert three - two == pytest.approx(two - one, rel=0.02) and one - (two - one) > 0  # per prompt, and one chunk
    growth = [memory.graph_bytes(model.cfg, 1, 8192, torch.float32, recompute=r) / memory.graph_bytes(
        model.cfg, 1, 4096, torch.float32, recompute=r) for r in (False, True)]
    assert growth[1] < growth[0]
    # memory for the recomputing graph but not for the kept one: auto builds it, keep is refused
    tokens = torch.randint(0, 50, (1, 30))
    from gradgraph.metrics import logit_diff

    need = memory.graph_bytes(model.cfg, 1, 30, torch.float32, recompute=True)
    assert need < memory.graph_bytes(model.cfg, 1, 30, torch.float32)
    monkeypatch.setattr(memory, "available_bytes", lambda device: need)
    monkeypatch.setattr(memory, "PATTERN_BUDGET", 0)
    assert build_graph(model, tokens, logit_diff(1, 2)).activations.formed_on_read(names.name("pattern", 1))
    with pytest.raises(GradGraphError, match="needs about"):
        build_graph(model, tokens, logit_diff(1, 2), patterns="keep")
    assert no_hooks_left(model)
