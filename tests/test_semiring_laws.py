"""Semiring laws (property-based) and the fast kernels (matmul, sum) against plus/times."""

from __future__ import annotations

import itertools

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis.extra.numpy import arrays

import gradgraph.semirings as semirings
from gradgraph.semirings import Abs, Entropy, KMax, Log, Max, Real, SignedMax

SEMIRINGS = {
    "Real": Real,
    "Abs": Abs,
    "Log": Log,
    "Max": Max,
    "SignedMax": SignedMax,
    "KMax3": KMax(3),
    "Entropy": Entropy,
}
NAMES = list(SEMIRINGS)
RTOL, ATOL = 1e-9, 1e-12
F64 = torch.float64

LAWS = settings(max_examples=50, deadline=None)

# finite weights in a moderate range, zeros and negatives included
weight = st.one_of(st.just(0.0), st.floats(1e-3, 5.0), st.floats(-5.0, -1e-3), st.sampled_from([1.0, -1.0, 2.0]))
SHAPES = st.sampled_from([(3,), (2, 2)])


@st.composite
def weight_arrays(draw, shape):
    return draw(arrays(np.float64, shape, elements=weight))


@st.composite
def values(draw, shape):
    """A valid semiring value of node shape ``shape``: ⊕ of 1 to 3 converted weights (1 to 3 'paths')."""
    n = draw(st.integers(1, 3))
    return [draw(weight_arrays(shape)) for _ in range(n)]


def realise(sr, parts):
    out = sr.convert(torch.tensor(parts[0], dtype=F64))
    for p in parts[1:]:
        out = sr.plus(out, sr.convert(torch.tensor(p, dtype=F64)))
    return out


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    assert a.shape == b.shape, (a.shape, b.shape)
    assert not torch.isnan(a).any() and not torch.isnan(b).any()
    return torch.allclose(a, b, rtol=RTOL, atol=ATOL, equal_nan=False)  # ±inf equal to itself


def check(a, b, what):
    assert close(a, b), f"{what}:\n{a}\n!=\n{b}"


triple = SHAPES.flatmap(lambda s: st.tuples(values(s), values(s), values(s)))


# --------------------------------------------------------------------------- laws


@pytest.mark.parametrize("name", NAMES)
@LAWS
@given(abc=triple)
def test_plus_associative_commutative(name, abc):
    sr = SEMIRINGS[name]
    a, b, c = (realise(sr, x) for x in abc)
    check(sr.plus(sr.plus(a, b), c), sr.plus(a, sr.plus(b, c)), "(a⊕b)⊕c = a⊕(b⊕c)")
    check(sr.plus(a, b), sr.plus(b, a), "a⊕b = b⊕a")


@pytest.mark.parametrize("name", NAMES)
@LAWS
@given(abc=triple)
def test_times_associative_commutative(name, abc):
    sr = SEMIRINGS[name]
    a, b, c = (realise(sr, x) for x in abc)
    check(sr.times(sr.times(a, b), c), sr.times(a, sr.times(b, c)), "(a⊗b)⊗c = a⊗(b⊗c)")
    check(sr.times(a, b), sr.times(b, a), "a⊗b = b⊗a")


@pytest.mark.parametrize("name", NAMES)
@LAWS
@given(abc=triple)
def test_distributive(name, abc):
    sr = SEMIRINGS[name]
    a, b, c = (realise(sr, x) for x in abc)
    check(sr.times(a, sr.plus(b, c)), sr.plus(sr.times(a, b), sr.times(a, c)), "a⊗(b⊕c) = a⊗b ⊕ a⊗c")
    check(sr.times(sr.plus(b, c), a), sr.plus(sr.times(b, a), sr.times(c, a)), "(b⊕c)⊗a = b⊗a ⊕ c⊗a")


@pytest.mark.parametrize("name", NAMES)
@LAWS
@given(parts=SHAPES.flatmap(values))
def test_identities_and_annihilation(name, parts):
    sr = SEMIRINGS[name]
    a = realise(sr, parts)
    shape = a.shape[1:]
    zero = sr.zero(shape, dtype=F64, device="cpu")
    one = sr.one(shape, dtype=F64, device="cpu")
    assert zero.shape == one.shape == a.shape
    check(sr.plus(a, zero), a, "a⊕0 = a")
    check(sr.plus(zero, a), a, "0⊕a = a")
    check(sr.times(a, zero), zero, "a⊗0 = 0")
    check(sr.times(zero, a), zero, "0⊗a = 0")
    check(sr.times(a, one), a, "a⊗1 = a")
    check(sr.times(one, a), a, "1⊗a = a")
    # an edge of weight 0 is no edge: it converts to the zero
    check(sr.convert(torch.zeros(shape, dtype=F64)), zero, "convert(0) = 0")
    assert bool(sr.is_zero(zero).all()) and bool(sr.is_zero(sr.times(a, zero)).all())


@pytest.mark.parametrize("name", NAMES)
@LAWS
@given(wv=SHAPES.flatmap(lambda s: st.tuples(weight_arrays(s), weight_arrays(s))))
def test_convert_is_a_homomorphism_of_products(name, wv):
    """convert(w) ⊗ convert(v) = convert(w·v): a path's value is the converted product of its weights."""
    w, v = wv
    sr = SEMIRINGS[name]
    tw, tv = torch.tensor(w, dtype=F64), torch.tensor(v, dtype=F64)
    check(sr.times(sr.convert(tw), sr.convert(tv)), sr.convert(tw * tv), "convert(w)⊗convert(v) = convert(wv)")


# --------------------------------------------------------------------------- sum and the kernels


def explicit_sum(sr, a, dim):
    """⊕ over ``dim`` of the node shape by folding plus."""
    slices = [a.select(dim + 1, i) for i in range(a.shape[dim + 1])]
    out = slices[0]
    for s in slices[1:]:
        out = sr.plus(out, s)
    return out


@pytest.mark.parametrize("name", NAMES)
@LAWS
@given(parts=values((3, 2, 4)), dim=st.integers(0, 2))
def test_sum_is_folded_plus(name, parts, dim):
    sr = SEMIRINGS[name]
    a = realise(sr, parts)
    check(sr.sum(a, dim), explicit_sum(sr, a, dim), f"sum over dim {dim}")


def explicit_matmul(sr, x, w):
    """out[n, i, k] = ⊕_j x[n, i, j] ⊗ convert(w[n|0, j, k]), one scalar at a time from plus/times."""
    S, N, I, J = x.shape
    Nw, _, Kk = w.shape
    N_out = max(N, Nw)
    out = torch.empty((S, N_out, I, Kk), dtype=x.dtype)
    for n, i, k in itertools.product(range(N_out), range(I), range(Kk)):
        xn, wn = (n if N > 1 else 0), (n if Nw > 1 else 0)
        total = sr.zero((), dtype=x.dtype, device="cpu")
        for j in range(J):
            total = sr.plus(total, sr.times(x[:, xn, i, j], sr.convert(w[wn, j, k])))
        out[:, n, i, k] = total
    return out


def random_case(sr, seed, N, Nw, I=6, J=9, K=4):  # I = 6, J = 9: the kernels take rows and w rows four at a time, then the rest
    gen = torch.Generator().manual_seed(seed)
    # x: values of 1 to 3 'paths' each, with whole semiring zeros
    x = sr.zero((N, I, J), dtype=F64, device="cpu")
    for _ in range(3):
        raw = torch.randn((N, I, J), generator=gen, dtype=F64) * 2
        raw[torch.rand((N, I, J), generator=gen) < 0.3] = 0.0
        x = sr.plus(x, sr.convert(raw))
    x[:, 0, 0, :] = sr.zero((J,), dtype=F64, device="cpu")  # a whole row without paths
    x[:, -1, -1, 1] = sr.zero((), dtype=F64, device="cpu")
    x[:, :, :4, 4:8] = sr.zero((N, 4, 4), dtype=F64, device="cpu")  # four rows with no path through four columns
    w = torch.randn((Nw, J, K), generator=gen, dtype=F64)
    w[torch.rand((Nw, J, K), generator=gen) < 0.3] = 0.0
    w[:, :, 0] = 0.0  # a column no path reaches
    w[0, 2, :] = 0.0
    return x, w


MATMUL_SHAPES = [(2, 1), (2, 2), (1, 1)]  # (N of x, N of w)


@pytest.mark.parametrize("shapes", MATMUL_SHAPES, ids=lambda s: f"N{s[0]}-W{s[1]}")
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("seed", [0, 1])
def test_matmul_equals_explicit(name, shapes, seed):
    sr = SEMIRINGS[name]
    x, w = random_case(sr, seed, *shapes)
    expected = explicit_matmul(sr, x, w)
    assert sr.is_zero(expected).any() and not sr.is_zero(expected).all()
    got = sr.matmul(x, w)
    check(got, expected, f"{name}.matmul")


@pytest.mark.parametrize("shapes", MATMUL_SHAPES, ids=lambda s: f"N{s[0]}-W{s[1]}")
@pytest.mark.parametrize("name", NAMES)
def test_matmul_of_a_transposed_view(name, shapes):
    """x laid out transposed (a view, as q·k's gradient towards k is): the same values."""
    sr = SEMIRINGS[name]
    x, w = random_case(sr, 3, *shapes)
    viewed = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not viewed.is_contiguous()
    check(sr.matmul(viewed, w), explicit_matmul(sr, x, w), f"{name}.matmul of a transposed view")


@pytest.mark.parametrize("shapes", MATMUL_SHAPES, ids=lambda s: f"N{s[0]}-W{s[1]}")
@pytest.mark.parametrize("name", NAMES)
def test_matmul_in_chunks(name, shapes, monkeypatch):
    """The chunked max-times kernels give the same result when every chunk is tiny."""
    sr = SEMIRINGS[name]
    x, w = random_case(sr, 5, *shapes, I=5)
    whole = sr.matmul(x, w)
    monkeypatch.setattr(semirings, "CHUNK_ELEMENTS", 1)
    check(sr.matmul(x, w), whole, f"{name}.matmul chunked")
    check(whole, explicit_matmul(sr, x, w), f"{name}.matmul")


@pytest.mark.parametrize("name", ["Real", "Abs", "Log", "Entropy"])
def test_op_kernels_equal_semiring_kernels_when_plus_is_a_sum(name):
    sr = SEMIRINGS[name]
    x, w = random_case(sr, 3, 2, 2)
    check(sr.op_matmul(x, w), sr.matmul(x, w), "op_matmul")
    check(sr.op_sum(x, 2), sr.sum(x, 2), "op_sum")


def test_max_op_kernels_are_ordinary_sums():
    """Max's op_matmul / op_sum add (Du et al.'s granularity="op"), so they dominate matmul / sum."""
    x, w = random_case(Max, 4, 2, 2)
    op, exact = Max.op_matmul(x, w), Max.matmul(x, w)
    check(op, (x[0] @ w.abs())[None], "op_matmul = x @ |w|")
    assert (op >= exact * (1 - 1e-12)).all() and (op > exact * (1 + 1e-6)).any()
    check(Max.op_sum(x, 2), x.sum(3), "op_sum")


def rank1_case(sr, seed, spread=0.0, rows=5, n=7):
    """Values ``[S, rows, n]`` with whole zeros, and softmax-like, generic and centring factors."""
    gen = torch.Generator().manual_seed(seed)
    x = sr.zero((rows, n), dtype=F64, device="cpu")
    for _ in range(2):
        raw = torch.randn((rows, n), generator=gen, dtype=F64) * 2
        raw[torch.rand((rows, n), generator=gen) < 0.25] = 0.0
        x = sr.plus(x, sr.convert(raw))
    if spread:  # ⊗ a path of weight e^(spread · N(0, 1)) (a log held as it is: e^±800 is past float64)
        log_w = torch.randn((rows, n), generator=gen, dtype=F64) * spread
        x = sr.times(x, log_w.expand(sr.size, rows, n))
    x[:, 0] = sr.zero((n,), dtype=F64, device="cpu")  # a row without paths
    p = torch.softmax(torch.randn((rows, n), generator=gen, dtype=F64), -1)
    p[:, -2:] = 0.0  # masked keys
    p[1, 1:] = 0.0  # a row of one key (its output is the diagonal alone)
    generic = [torch.randn((rows, n), generator=gen, dtype=F64) for _ in range(3)]
    generic[1][:, ::3] = 0.0
    one = torch.ones(n, dtype=F64)
    return x, {"softmax": (p, -p, p), "generic": tuple(generic), "centring": (one, one, -one / n)}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("spread", [0.0, 400.0], ids=["moderate", "wide"])
def test_rank1_equals_the_dense_jacobian(name, spread):
    """``rank1(v, a, b, c)`` (the compiled kernels for Max and Entropy) = the product with the dense
    ``J = diag(a) + b cᵀ``; a wide spread of path weights (e^±800 apart) takes Entropy's kernel
    through the element whose others underflow against it."""
    sr = SEMIRINGS[name]
    if spread > 100 and name not in ("Log", "Entropy"):
        pytest.skip("plain values cannot hold path weights e^±800 apart")
    x, factors = rank1_case(sr, 7, spread)
    for kind, (a, b, c) in factors.items():
        jac = torch.diag_embed(a.expand(x.shape[1:])) + b.expand(x.shape[1:])[..., :, None] * c.expand(x.shape[1:])[..., None, :]
        expected = explicit_matmul(sr, x[:, :, None, :], jac.transpose(-1, -2))[:, :, 0]  # out_j = ⊕_k J[j, k] ⊗ x_k
        check(sr.rank1(x, a, b, c), expected, f"{name}.rank1 ({kind})")
