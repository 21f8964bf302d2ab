"""Every semiring against an independent reference on the scalar graph (``to_networkx``).

The reference is a plain dynamic program over the networkx DAG written here in Python floats
(it never calls ``gradgraph.semirings``); on graphs small enough it is itself checked against an
explicit enumeration of every path with ``networkx.all_simple_paths``.
"""

from __future__ import annotations

import math
from functools import lru_cache

import networkx as nx
import pytest
import torch

from gradgraph.arch import names

from gradgraph import tiny_model
from gradgraph.backprop import backprop, forward
from gradgraph.build import build_graph
from gradgraph.metrics import logit_diff, logprob_diff, mask_positions, select_positions
from gradgraph.semirings import Abs, Count, Entropy, KMax, Log, Max, Real, SignedMax

K = 3
SINK = "metric"
RTOL = 1e-9
ATOL = 1e-12
SEMIRINGS = {
    "Real": Real,
    "Abs": Abs,
    "Log": Log,
    "Count": Count,
    "Max": Max,
    "SignedMax": SignedMax,
    "KMax3": KMax(K),
    "Entropy": Entropy,
}


# --------------------------------------------------------------------------- metrics


def logprob_of(token: int):
    """log p(token) at the last real position: depends on every vocabulary logit."""

    def metric(logits, attention_mask=None):
        return select_positions(logits, -1, attention_mask).log_softmax(-1)[:, token]

    return metric


def logit_of(token: int):
    """One logit at the last real position (half the paths of a difference)."""

    def metric(logits, attention_mask=None):
        return select_positions(logits, -1, attention_mask)[:, token]

    return metric


# --------------------------------------------------------------------------- reference statistics
#
# A statistics record over a set of paths with signed products p (|p| = a):
#   real = Σ p, abs = Σ a, logs = list of log a (log-sum-exp later), max = max a,
#   hi / lo = max / min p, top = the K largest a (descending), Z = Σ a, R = Σ a log a,
#   Rabs = Σ a |log a|  (a scale for cancellation in R), 'n' = number of paths.


def _one():
    return dict(real=1.0, abs=1.0, log=0.0, max=1.0, hi=1.0, lo=1.0, top=[1.0], Z=1.0, R=0.0, Rabs=0.0, n=1)


def _zero():
    return dict(real=0.0, abs=0.0, log=-math.inf, max=0.0, hi=-math.inf, lo=math.inf, top=[], Z=0.0, R=0.0,
                Rabs=0.0, n=0)


def _logsumexp(terms):
    terms = [t for t in terms if t != -math.inf]
    if not terms:
        return -math.inf
    m = max(terms)
    return m + math.log(sum(math.exp(t - m) for t in terms))


def _combine(edges):
    """⊕ over edges of (w ⊗ stats): edges is a list of (w, stats of the far end)."""
    out = _zero()
    logs, tops = [], []
    for w, s in edges:
        if s["n"] == 0:
            continue
        a = abs(w)
        la = math.log(a)
        out["real"] += w * s["real"]
        out["abs"] += a * s["abs"]
        logs.append(la + s["log"])
        out["max"] = max(out["max"], a * s["max"])
        out["hi"] = max(out["hi"], w * s["hi"], w * s["lo"])
        out["lo"] = min(out["lo"], w * s["hi"], w * s["lo"])
        tops.extend(a * t for t in s["top"])
        out["Z"] += a * s["Z"]
        out["R"] += a * s["R"] + a * la * s["Z"]
        out["Rabs"] += a * s["Rabs"] + a * abs(la) * s["Z"]
        out["n"] += s["n"]
    out["log"] = _logsumexp(logs)
    out["top"] = sorted(tops, reverse=True)[:K]
    return out


def backward_dp(G):
    """Statistics over all paths node → sink, for every node of the DAG."""
    stats = {}
    for u in reversed(list(nx.topological_sort(G))):
        if u == SINK:
            stats[u] = _one()
        else:
            stats[u] = _combine([(G[u][v]["weight"], stats[v]) for v in G.successors(u)])
    return stats


def forward_dp(G, sources):
    """Statistics over all paths source → node (sources carry one), for every node of the DAG."""
    stats = {}
    for v in nx.topological_sort(G):
        if v in sources:
            assert G.in_degree(v) == 0, f"source {v} has incoming edges"
            stats[v] = _one()
        else:
            stats[v] = _combine([(G[u][v]["weight"], stats[u]) for u in G.predecessors(v)])
    return stats


def enumerate_stats(G, start):
    """The same statistics from an explicit list of every path start → sink."""
    products = []
    for path in nx.all_simple_paths(G, start, SINK):
        p = 1.0
        for u, v in zip(path[:-1], path[1:]):
            p *= G[u][v]["weight"]
        products.append(p)
    a = [abs(p) for p in products]
    return dict(
        real=math.fsum(products),
        abs=math.fsum(a),
        log=_logsumexp([math.log(x) for x in a]),
        max=max(a, default=0.0),
        hi=max(products, default=-math.inf),
        lo=min(products, default=math.inf),
        top=sorted(a, reverse=True)[:K],
        Z=math.fsum(a),
        R=math.fsum(x * math.log(x) for x in a),
        Rabs=math.fsum(x * abs(math.log(x)) for x in a),
        n=len(products),
    )


def path_counts(G):
    counts = {}
    for u in reversed(list(nx.topological_sort(G))):
        counts[u] = 1 if u == SINK else sum(counts[v] for v in G.successors(u))
    return counts


# --------------------------------------------------------------------------- expected semiring values


def expected_value(sr_name: str, s: dict) -> list[float]:
    if sr_name == "Real":
        return [s["real"]]
    if sr_name == "Abs":
        return [s["abs"]]
    if sr_name == "Log":
        return [s["log"]]
    if sr_name == "Count":
        return [math.log(s["n"]) if s["n"] else -math.inf]
    if sr_name == "Max":
        return [s["max"]]
    if sr_name == "SignedMax":
        return [s["hi"], s["lo"]]
    if sr_name == "KMax3":
        return list(s["top"]) + [0.0] * (K - len(s["top"]))
    if sr_name == "Entropy":
        if s["Z"] == 0:
            return [-math.inf, 0.0]
        return [math.log(s["Z"]), s["R"] / s["Z"]]
    raise AssertionError(sr_name)


def tolerance(sr_name: str, s: dict) -> list[float]:
    """Absolute tolerance per component: signed sums may cancel, so scale by the unsigned sum."""
    if sr_name == "Real":
        return [ATOL + RTOL * s["abs"]]
    if sr_name == "Entropy":
        return [ATOL, ATOL + (RTOL * s["Rabs"] / s["Z"] if s["Z"] > 0 else 0.0)]
    return [ATOL] * len(expected_value(sr_name, s))


def zero_value(sr_name: str) -> list[float]:
    return expected_value(sr_name, _zero())


def tensor_index(g, node) -> tuple[str, tuple[int, ...]]:
    """(node name, index into backprop's tensor) of a networkx node; logits map vocab ids to columns."""
    name, idx = node
    if name == names.name("logits"):
        (col,) = (g.logit_ids == idx[-1]).nonzero()[:, 0].tolist()
        idx = idx[:-1] + (col,)
    return name, idx


def assert_matches(g, G, values: dict, stats: dict, sr_name: str, what: str):
    """Compare every element of every node's value tensor: nx nodes with the reference, others with zero."""
    covered: dict[str, dict] = {}
    for node, s in stats.items():
        if node == SINK:
            continue
        name, idx = tensor_index(g, node)
        covered.setdefault(name, {})[idx] = s
    unknown = set(covered) - set(values)
    assert not unknown, f"networkx nodes {sorted(unknown)} have no value in {what}"
    failures = []
    checked = 0
    for name in g.order:
        got = values[name].detach().double().cpu()
        shape = tuple(g.shapes[name])
        size = len(zero_value(sr_name))
        assert tuple(got.shape) == (size, *shape), f"{what}[{name}] has shape {tuple(got.shape)}"
        expected = torch.empty_like(got)
        atol = torch.full_like(got, ATOL)
        zero = torch.tensor(zero_value(sr_name), dtype=torch.float64)
        expected[:] = zero.reshape((size,) + (1,) * len(shape))
        for idx, s in covered.get(name, {}).items():
            expected[(slice(None), *idx)] = torch.tensor(expected_value(sr_name, s), dtype=torch.float64)
            atol[(slice(None), *idx)] = torch.tensor(tolerance(sr_name, s), dtype=torch.float64)
        ok = torch.isclose(got, expected, rtol=RTOL, atol=0.0) | ((got - expected).abs() <= atol)
        ok |= got == expected  # equal infinities
        checked += got.numel()
        if not ok.all():
            bad = (~ok).nonzero()[:3].tolist()
            for b in bad:
                failures.append(f"{name}{tuple(b[1:])}[{b[0]}]: got {got[tuple(b)].item()!r}, "
                                f"reference {expected[tuple(b)].item()!r}")
    assert checked > 0
    assert not failures, f"{sr_name} {what} disagrees with the reference at:\n" + "\n".join(failures[:12])


# --------------------------------------------------------------------------- cases

BASE = dict(n_layers=1, d_model=4, n_heads=2, d_head=2, d_mlp=4, n_ctx=8, d_vocab=8, dtype=torch.float64)

# name -> (arch, model overrides, tokens, attention mask or None, metric)
CASES = {
    "gpt2-s0": ("gpt2", dict(seed=0), [[1, 5, 2]], None, logit_diff(1, 2)),
    "llama-s1": ("llama", dict(seed=1), [[3, 0, 7]], None, logit_diff(4, 6)),
    "gpt2-s2-pad-logprob": ("gpt2", dict(seed=2), [[1, 2, 3], [4, 5, 0]], [[1, 1, 1], [1, 1, 0]], logprob_of(3)),
    "llama-s3-gqa-d6-pad": ("llama", dict(seed=3, d_model=6, n_heads=4, n_key_value_heads=2),
                            [[2, 6, 1], [7, 0, 0]], [[1, 1, 1], [1, 0, 0]],
                            logit_diff(torch.tensor([1, 2]), torch.tensor([5, 3]))),
    "llama-s32-gqa-pad": ("llama", dict(seed=32, d_model=8, n_heads=4, n_key_value_heads=2),  # as a bridge allows
                          [[2, 6, 1], [7, 3, 0]], [[1, 1, 1], [1, 1, 0]],
                          logit_diff(torch.tensor([1, 2]), torch.tensor([5, 3]))),
    "gpt2-s4-d6-logprobdiff": ("gpt2", dict(seed=4, d_model=6), [[6, 3, 3]], None, logprob_diff(0, 7)),
    "gpt2-s5-2layers": ("gpt2", dict(seed=5, n_layers=2), [[4, 1]], None, logit_diff(2, 3)),
    "llama-s6-2layers-pad-logprob": ("llama", dict(seed=6, n_layers=2), [[5, 2], [3, 0]], [[1, 1], [1, 0]],
                                     logprob_of(0)),
}
# every other family, one layer (gradgraph.arch.models.FAMILIES: each family's TransformerLens flags)
FAMILY_CASES = {
    "pythia-s20-pad": ("pythia", dict(seed=20), [[1, 5, 2], [4, 6, 0]], [[1, 1, 1], [1, 1, 0]], logit_diff(1, 2)),
    "gptj-s21": ("gptj", dict(seed=21, d_head=4, d_model=8), [[3, 1, 7]], None, logprob_of(2)),
    "phi-s22": ("phi", dict(seed=22, d_head=4, d_model=8), [[2, 2, 5]], None, logit_diff(3, 1)),
    "gemma-s23": ("gemma", dict(seed=23), [[6, 1, 3]], None, logit_diff(0, 5)),
    "gemma2-s24-pad": ("gemma2", dict(seed=24, attn_scores_soft_cap=0.5, output_logits_soft_cap=0.3, window_size=2),
                       [[1, 4, 2], [3, 5, 0]], [[1, 1, 1], [1, 1, 0]], logprob_of(1)),
    "qwen3-s25": ("qwen3", dict(seed=25), [[5, 3, 1]], None, logit_diff(2, 4)),
    "olmo2-s26": ("olmo2", dict(seed=26), [[7, 2, 4]], None, logit_diff(6, 1)),
    "attn-only-s27": ("attn-only", dict(seed=27), [[1, 2, 3]], None, logprob_of(4)),
    "no-norm-s28": ("no-norm", dict(seed=28), [[4, 4, 1]], None, logit_diff(2, 7)),
    "solu-s29": ("solu", dict(seed=29), [[2, 6, 3]], None, logit_diff(5, 0)),
    "bert-s30-pad-mask": ("bert", dict(seed=30), [[1, 7, 2], [3, 0, 7]], [[1, 1, 1], [1, 1, 1]],
                          logit_diff(torch.tensor([1, 2]), torch.tensor([4, 5]),  # at the [MASK] (id 7)
                                     pos=mask_positions(None, torch.tensor([[1, 7, 2], [3, 0, 7]]), 7))),
    "bert-s31-pad": ("bert", dict(seed=31), [[2, 5, 7], [7, 1, 0]], [[1, 1, 1], [1, 1, 0]],
                     logit_diff(3, 6, pos=mask_positions(None, torch.tensor([[2, 5, 7], [7, 1, 0]]), 7))),
}
CASES.update(FAMILY_CASES)


def make_graph(arch, overrides, tokens, mask, metric):
    cfg = {**BASE, **overrides}
    model = tiny_model(arch, **cfg)
    toks = torch.tensor(tokens, dtype=torch.long)
    attention_mask = None if mask is None else torch.tensor(mask, dtype=torch.long)
    return build_graph(model, toks, metric, attention_mask=attention_mask)


def real_sources(g, G):
    return {n for n in G if isinstance(n, tuple) and n[0] in g.sources and bool(g.source_mask[n[1][0], n[1][1]])}


@lru_cache(maxsize=None)
def case(name):
    g = make_graph(*CASES[name])
    G = g.to_networkx()
    return g, G, backward_dp(G), forward_dp(G, real_sources(g, G))


# --------------------------------------------------------------------------- the reference itself


ENUM_BASE = dict(n_layers=1, d_model=2, n_heads=1, n_ctx=8, d_vocab=4, d_mlp=2, dtype=torch.float64)
ENUM_CASES = {
    # d_head=1 keeps gpt2 under ~1e5 paths from the inputs; llama needs an even d_head
    "gpt2": ("gpt2", dict(seed=7, d_head=1), [[1, 3]], None, logit_of(2)),
    "llama": ("llama", dict(seed=8, d_head=2, n_key_value_heads=1), [[2, 1]], None, logit_of(3)),
}
PATH_LIMIT = 100_000


def _close(x, y, scale=0.0):
    if x == y:
        return True
    return abs(x - y) <= 1e-10 * max(abs(x), abs(y), scale) + 1e-13


@pytest.mark.parametrize("arch", list(ENUM_CASES))
def test_dp_matches_path_enumeration(arch):
    arch_, over, tokens, mask, metric = ENUM_CASES[arch]
    g = make_graph(arch_, {**ENUM_BASE, **over}, tokens, mask, metric)
    G = g.to_networkx()
    counts = path_counts(G)
    sources = real_sources(g, G)
    assert sources and all(counts[s] > 0 for s in sources)
    total = sum(counts[s] for s in sources)
    assert 1_000 < total <= PATH_LIMIT, f"{total} paths from the inputs: shrink the enumeration model"
    stats = backward_dp(G)
    # every input element, plus every node of the attention block (few paths each)
    starts = set(sources) | {n for n in G if isinstance(n, tuple) and "attn" in n[0] and counts[n] <= 5_000}
    assert any("hook_pattern" in n[0] for n in starts) and any("hook_attn_scores" in n[0] for n in starts)
    for start in sorted(starts, key=str):
        ref = enumerate_stats(G, start)
        dp = stats[start]
        assert ref["n"] == dp["n"] == counts[start]
        for key in ("abs", "log", "max", "hi", "lo", "Z"):
            assert _close(dp[key], ref[key]), (start, key, dp[key], ref[key])
        assert _close(dp["real"], ref["real"], ref["abs"]), (start, "real", dp["real"], ref["real"])
        assert _close(dp["R"], ref["R"], ref["Rabs"]), (start, "R", dp["R"], ref["R"])
        assert len(dp["top"]) == len(ref["top"]) == min(K, ref["n"])
        assert all(_close(a, b) for a, b in zip(dp["top"], ref["top"])), (start, dp["top"], ref["top"])


def test_reference_distinguishes_semirings():
    """The reference statistics are not degenerate: paths of both signs, several distinct products."""
    g, G, stats, _ = case("gpt2-s0")
    s = max((stats[n] for n in real_sources(g, G)), key=lambda t: t["n"])
    assert s["n"] > 1000
    assert s["hi"] > 0 > s["lo"]
    assert s["top"][0] > s["top"][1] > s["top"][2] > 0
    assert s["max"] < s["abs"] and abs(s["real"]) < s["abs"]


# --------------------------------------------------------------------------- gradgraph vs reference


@pytest.mark.parametrize("name", list(CASES))
def test_networkx_edge_count(name):
    g, G, _, _ = case(name)
    assert G.number_of_edges() == g.n_scalar_edges() + g.batch_size
    assert all(G[u][v]["weight"] != 0 and math.isfinite(G[u][v]["weight"]) for u, v in G.edges)
    assert nx.is_directed_acyclic_graph(G)
    assert G.out_degree(SINK) == 0 and G.in_degree(SINK) == g.batch_size


@pytest.mark.parametrize("name", list(CASES))
def test_real_backprop_equals_autograd_paths(name):
    """Sanity of to_networkx: the signed path sum on the scalar graph is backprop(Real)."""
    g, G, stats, _ = case(name)
    assert_matches(g, G, backprop(g, Real), stats, "Real", "backprop")
    # and at the inputs it is non-trivial
    assert any(abs(stats[s]["real"]) > 1e-6 for s in real_sources(g, G))


@pytest.mark.parametrize("sr_name", [n for n in SEMIRINGS if n != "Real"])
@pytest.mark.parametrize("name", list(CASES))
def test_backprop_matches_reference(name, sr_name):
    g, G, stats, _ = case(name)
    assert_matches(g, G, backprop(g, SEMIRINGS[sr_name]), stats, sr_name, "backprop")


@pytest.mark.parametrize("sr_name", list(SEMIRINGS))
@pytest.mark.parametrize("name", ["gpt2-s0", "llama-s3-gqa-d6-pad", "gpt2-s5-2layers", "llama-s6-2layers-pad-logprob"])
def test_forward_matches_reference(name, sr_name):
    g, G, _, fstats = case(name)
    assert_matches(g, G, forward(g, SEMIRINGS[sr_name]), fstats, sr_name, "forward")


# --------------------------------------------------------------------------- granularity="op"


@pytest.mark.parametrize("name", ["gpt2-s0", "llama-s3-gqa-d6-pad"])
def test_op_granularity(name):
    g, _, _, _ = case(name)
    for direction in (backprop, forward):
        for sr_name in ("Real", "Abs", "Log", "Entropy"):
            sr = SEMIRINGS[sr_name]
            neuron = direction(g, sr, granularity="neuron")
            op = direction(g, sr, granularity="op")
            for node in g.order:
                assert torch.allclose(op[node], neuron[node], rtol=RTOL, atol=ATOL), (direction.__name__, sr_name, node)
        neuron = direction(g, Max, granularity="neuron")
        op = direction(g, Max, granularity="op")
        strictly = False
        for node in g.order:
            assert (op[node] >= neuron[node] * (1 - 1e-12) - ATOL).all(), (direction.__name__, node)
            strictly |= bool((op[node] > neuron[node] * (1 + 1e-6) + ATOL).any())
        assert strictly, f"Max {direction.__name__}: op granularity equals neuron everywhere"


# --------------------------------------------------------------------------- padding


@pytest.mark.parametrize("name", ["gpt2-s2-pad-logprob", "llama-s3-gqa-d6-pad"])
@pytest.mark.parametrize("sr_name", list(SEMIRINGS))
def test_padding_carries_the_zero(name, sr_name):
    g, _, _, _ = case(name)
    sr = SEMIRINGS[sr_name]
    pad = ~g.source_mask  # [batch, pos]
    assert pad.any() and (~pad).any()
    zero = sr.zero((), dtype=torch.float64, device="cpu")
    for values, what in ((backprop(g, sr), "backprop"), (forward(g, sr), "forward")):
        for node in ("blocks.0.hook_resid_pre", "blocks.0.hook_resid_post", "blocks.0.hook_mlp_out",
                     "blocks.0.attn.hook_z", "ln_final.hook_normalized"):
            v = values[node]  # [S, batch, pos, ...]
            at_pad = v[:, pad]  # [S, n_pad, ...]
            expected = zero.reshape((-1,) + (1,) * (at_pad.ndim - 1)).expand_as(at_pad)
            assert torch.equal(at_pad, expected), (what, node)
            if sr_name == "Real" and what == "forward" and node != "blocks.0.hook_resid_pre":
                continue  # a constant shift of all inputs is cancelled by LayerNorm: Σ Π w ≈ 0 there
            real = v[:, ~pad]
            assert not torch.equal(real, zero.reshape((-1,) + (1,) * (real.ndim - 1)).expand_as(real)), (what, node)
