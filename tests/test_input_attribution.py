"""Input attributions: IG equals captum, DIG/UDIG paths are monotone, UDIG on the straight line is
IG, conductance at every residual cut matches the input attribution, LAFA with λ = 0 is its base,
and the faithfulness metrics give what a hand-built model says they must."""

import math

import pytest
import torch

from gradgraph import GradGraphError, tiny_model
from gradgraph.attribution import attribute, integrated_flow
from gradgraph.faithfulness import Example, measure
from gradgraph.ig_paths import monotone, quadrature
from gradgraph.metrics import logit_diff
from gradgraph.neighbours import vocabulary_neighbours
from gradgraph.semirings import Abs, Max

from conftest import no_hooks_left

METRIC = logit_diff(3, 8)
IDS = torch.tensor([[5, 9, 13, 4, 7, 21]])
BASE = 1  # the baseline word (tiny models have no tokenizer)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("rule", ["gausslegendre", "riemann_left", "riemann_right", "riemann_middle"])
def test_ig_equals_captum_layer_integrated_gradients(arch, rule):
    from captum.attr import LayerIntegratedGradients

    model = tiny_model(arch, dtype=torch.float64, seed=0)
    baseline_ids = torch.full_like(IDS, BASE)
    reference, delta = LayerIntegratedGradients(lambda t: METRIC(model(t)), model.embed).attribute(
        IDS, baseline_ids, n_steps=16, method=rule, return_convergence_delta=True)
    ours = attribute(model, IDS, METRIC, method="ig", steps=16, rule=rule, baseline=BASE)
    assert torch.allclose(ours.values["hook_embed"], reference, atol=1e-5, rtol=0)
    assert torch.allclose(ours.delta, delta, atol=1e-8)
    assert no_hooks_left(model)


def test_ig_delta_shrinks_with_steps_and_rules_integrate_exactly():
    model = tiny_model("llama", dtype=torch.float64, seed=2)
    deltas = [abs(float(attribute(model, IDS, METRIC, method="ig", steps=n, baseline=BASE).delta)) for n in (4, 16, 64)]
    assert deltas[0] > deltas[1] >= deltas[2] and deltas[0] > 1e-3 and deltas[2] < 1e-6
    for rule in ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid"):
        alphas, weights = quadrature(rule, 7)
        exact = rule not in ("riemann_left", "riemann_right")  # ∫ α dα = ½ exactly, or within one step
        assert math.isclose(float(weights.sum()), 1.0)
        assert float((weights * alphas).sum()) == pytest.approx(0.5, abs=1e-12 if exact else 1 / 14 + 1e-12)


@pytest.mark.parametrize("method", ["dig", "udig"])
@pytest.mark.parametrize("strategy", ["greedy", "maxcount"])
@pytest.mark.parametrize("factor", [0, 1])
def test_discretized_paths_are_monotone_and_join_baseline_to_input(method, strategy, factor):
    model = tiny_model("gpt2", dtype=torch.float64, seed=1)
    a = attribute(model, IDS, METRIC, method=method, strategy=strategy, steps=6, factor=factor, baseline=BASE,
                  neighbours=20)
    path = a.path[0]  # [N, pos, d]
    W = model.W_E.detach()
    assert len(path) == 2**factor * 7 + 1
    assert torch.equal(path[0], W[torch.full_like(IDS[0], BASE)]) and torch.equal(path[-1], W[IDS[0]])
    for k in range(len(path) - 1):  # every step moves each dimension towards the input, never past it
        assert bool(monotone(path[k], path[-1], path[k + 1]).all())
    increments = (path[1:] - path[:-1])
    assert torch.allclose(a.scores.sum(1) - a.target, a.delta) and increments.abs().sum() > 0


def test_udig_with_the_straight_line_in_the_vocabulary_is_ig():
    model = tiny_model("llama", dtype=torch.float64, seed=3)
    ids, m = torch.tensor([[10, 11, 12]]), 4
    W = model.W_E.data
    row = 20
    for token in ids[0].tolist():  # the straight-line points b + j/(m+1)·(x − b) become words
        for j in range(1, m + 1):
            W[row] = W[BASE] + j / (m + 1) * (W[token] - W[BASE])
            row += 1
    udig = attribute(model, ids, METRIC, method="udig", steps=m, baseline=BASE, neighbours=5)
    ig = attribute(model, ids, METRIC, method="ig", steps=m + 1, rule="riemann_left", baseline=BASE)
    assert torch.allclose(udig.scores, ig.scores, atol=1e-10, rtol=0)


def test_vocabulary_neighbours_are_the_nearest_other_words():
    model = tiny_model("gpt2", seed=4)
    got = vocabulary_neighbours(model, 7)
    W = model.W_E.detach()
    distance = torch.cdist(W, W)
    distance.fill_diagonal_(float("inf"))
    assert torch.equal(got.long(), distance.argsort(1)[:, :7])


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_conductance_at_every_cut_matches_the_input_attribution(arch):
    model = tiny_model(arch, dtype=torch.float64, seed=5)
    coarse, fine = (integrated_flow(model, IDS, METRIC, baseline=BASE, steps=n, progress=False) for n in (8, 128))
    ig = attribute(model, IDS, METRIC, method="ig", steps=128, rule="riemann_left", baseline=BASE)
    assert torch.allclose(fine.values["hook_embed"], ig.values["hook_embed"], atol=1e-12)  # left Riemann at the input
    worst = lambda a: max(abs(float(d)) for d in a.cut_deltas.values())  # noqa: E731
    assert worst(fine) < worst(coarse) / 4 and worst(fine) < 0.05 * abs(float(fine.target))  # left Riemann: O(1/n)
    rows = fine.by_component()
    heads = sum(r["value"] for r in rows if r["kind"] == "head" and r["layer"] == 0)
    assert heads == pytest.approx(float(fine.values["blocks.0.attn.hook_z"].sum()))
    udig = attribute(model, IDS, METRIC, method="udig", steps=4, baseline=BASE)
    through = integrated_flow(model, IDS, METRIC, path="udig", steps=4, baseline=BASE, progress=False)
    assert torch.allclose(through.scores, udig.scores, atol=1e-12)  # the same polyline, the same left sum
    bound = integrated_flow(model, IDS, METRIC, baseline=BASE, steps=8, semiring=Abs, progress=False)
    assert bool((bound.values["hook_embed"] >= coarse.values["hook_embed"].abs() - 1e-12).all())
    with pytest.raises(GradGraphError, match="Real .* or Abs"):
        integrated_flow(model, IDS, METRIC, baseline=BASE, semiring=Max, progress=False)
    assert no_hooks_left(model)


def test_lafa_with_lambda_zero_is_its_base_method():
    model = tiny_model("gpt2", dtype=torch.float64, seed=6)
    corpus = torch.randint(2, 50, (12, 6), generator=torch.Generator().manual_seed(0))
    base = attribute(model, IDS, METRIC, method="grad_x_input", baseline=BASE)
    zero = attribute(model, IDS, METRIC, method="lafa", corpus=corpus, base="grad_x_input", lam=0.0, baseline=BASE)
    spread = attribute(model, IDS, METRIC, method="lafa", corpus=corpus, base="grad_x_input", lam=0.44,
                       kernel="cosine", baseline=BASE)
    assert torch.equal(zero.scores, base.scores) and not torch.allclose(spread.scores, base.scores)
    with pytest.raises(GradGraphError, match="corpus"):
        attribute(model, IDS, METRIC, method="lafa", corpus=[], baseline=BASE)


def _averaging_model() -> torch.nn.Module:
    """One uniform-attention head: logit(3) − logit(8) = s(last) + mean_j s(token_j), with s(t) the
    first embedding coordinate (tokens 1 and 4 carry 3 and −2, all others 0)."""
    model = tiny_model("gpt2", dtype=torch.float64, n_layers=1, normalization_type=None)
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
        model.W_E[1, 0], model.W_E[4, 0] = 3.0, -2.0
        model.blocks[0].attn.W_V[0, 0, 0] = model.blocks[0].attn.W_O[0, 0, 0] = 1.0
        model.W_U[0, 3] = 1.0
    return model


def test_faithfulness_metrics_on_a_hand_built_model():
    model = _averaging_model()
    sigma = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    example = Example(tokens=(0, 1, 2, 4, 2, 0), candidates=(1, 2, 3, 4), good=3, bad=8)
    p0 = sigma(1 / 6)  # (3 − 2) / 6
    with torch.no_grad():
        assert float(torch.sigmoid(METRIC(model(torch.tensor([example.tokens]))))) == pytest.approx(p0)
    scores = {"right": torch.tensor([0.0, 5, 1, -1, 0, 0]), "wrong": torch.tensor([0.0, -5, 1, 3, 0, 0])}
    got = measure(model, example, scores, replace_id=2, top=0.25)  # k = 1
    right, wrong = got["right"], got["wrong"]
    assert right["comprehensiveness"] == pytest.approx(p0 - sigma(-2 / 5))  # token 1 deleted
    assert right["sufficiency"] == pytest.approx(p0 - sigma(3 / 3))  # only token 1 kept (with BOS and the last)
    assert right["log_odds"] == pytest.approx(math.log(sigma(-2 / 6)) - math.log(p0))  # token 1 replaced by 2
    assert wrong["comprehensiveness"] == pytest.approx(p0 - sigma(3 / 5))  # the −2 token deleted: p rises
    assert right["levels"][-1] == pytest.approx(sigma(0.0))  # 90 %: all four candidates replaced
    assert right["comprehensiveness"] > 0 > wrong["comprehensiveness"]


def test_bad_inputs_get_clear_errors():
    model = tiny_model("llama", seed=7)
    cases = [
        (dict(tokens=torch.tensor([[5]])), "at least"),
        (dict(method="ig", steps=0), "steps"),
        (dict(method="ig", rule="simpson"), "rule"),
        (dict(method="dig", baseline="zeros"), "vocabulary words"),
        (dict(method="ig", baseline=torch.zeros(3, 16)), "pos, d_model"),
        (dict(method="ig", steps_=3), "options"),
        (dict(method="shap"), "unknown attribution method"),
        (dict(method="udig", strategy="best"), "strategy"),
    ]
    for case, match in cases:
        tokens = case.pop("tokens", IDS)
        case.setdefault("baseline", BASE)
        with pytest.raises(GradGraphError, match=match):
            attribute(model, tokens, METRIC, **case)
    with pytest.raises(GradGraphError, match="one prompt"):
        integrated_flow(model, torch.cat([IDS, IDS]), METRIC, baseline=BASE)
    assert no_hooks_left(model)
