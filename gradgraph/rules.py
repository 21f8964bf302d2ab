"""Rule sets: which local derivative block the graph builder emits for each op.

Rules change the graph, never the semiring or the recursion (DESIGN.md). The builder
(``gradgraph.build``) walks the model and, at every op, asks the rule set for that op's blocks:

- ``norm(NormOp) -> blocks``: a LayerNorm / RMSNorm ``y = x̃ / s``, ``s = sqrt(mean(x̃²) + ε)``
  (LayerNorm centres first, ``x̃ = x − mean(x)``);
- ``activation(f, x) -> diagonal``: the local weight of an element-wise ``y = f(x)``;
- ``softmax(SoftmaxOp) -> blocks``: attention scores → pattern, row by row;
- ``linear(block, x, y) -> blocks``: a linear map, handed as its true-Jacobian ``Matmul`` block,
  its input ``x`` and its output ``y`` (bias included);
- ``bilinear(product) -> (left factor, right factor)``: the factor on each operand's block of a
  bilinear product: ``"qk"`` (q·k → scores), ``"pv"`` (pattern · v → z), ``"gate"``
  (act(gate) ⊙ linear → the gated MLP's hidden state), ``"solu"`` (softmax(x) ⊙ x → SoLU's hidden
  state; the softmax is the first operand, as the gate is); a factor 0 emits no block;
- ``residual(SumOp) -> blocks``: a residual sum.

Copies (the per-head copies of the residual stream, the MLP's read of it), rotary rotations and the
metric's own derivative are the same under every rule set. ``GRADIENT`` gives the true Jacobians;
``backprop(graph, Real)`` on its graph is the gradient.

LRP rule sets are modified gradients (gradient × input form): ``backprop(graph, Real)`` gives at
each node a modified gradient ``g`` and the relevance there is ``activation ⊙ g``; the relevance
arriving at the logits is ``logits ⊙ ∂metric/∂logits`` (it sums to the metric for a logit
difference). Every semiring runs on these graphs unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch

from gradgraph.errors import GradGraphError
from gradgraph.graph import Block, Contract, Diag, Identity, Matmul, Pending, Rank1, SignSplit, Spread
from gradgraph.semirings import Real
from gradgraph.weights import Lazy, Weight, compact, lazily


@dataclass(frozen=True, eq=False)
class NormOp:
    """One firing of a norm: node names and what the forward pass recorded."""

    x: str  # the input node
    centered: str | None  # x̃'s node (LayerNorm) or None (RMSNorm: x̃ = x)
    scale: str  # s [..., 1]
    y: str  # y = x̃ / s
    x_value: torch.Tensor  # [..., n]
    x_tilde: torch.Tensor  # [..., n]
    s: torch.Tensor  # [..., 1]
    layer: int | None


@dataclass(frozen=True, eq=False)
class SoftmaxOp:
    """An attention softmax: ``pattern[b, h, q, :] = softmax(scores[b, h, q, :])`` over allowed keys."""

    scores: str
    pattern: str
    p: torch.Tensor | Lazy  # [batch, head, query, key] (a long prompt's formed when read)
    allowed: torch.Tensor  # [batch, 1, query, key] bool: causal and not padding
    layer: int
    s: torch.Tensor | Lazy | None = None  # the scores [batch, head, query, key]
    exact: bool = False  # p is exactly 0 wherever allowed is False (a batch without padding: masked to −inf)


@dataclass(frozen=True, eq=False)
class SumOp:
    """A residual sum ``target = Σ sources``."""

    sources: tuple[str, ...]
    target: str
    inputs: tuple[torch.Tensor, ...]  # each [batch, pos, d_model]
    layer: int | None


@dataclass(frozen=True)
class RuleSet:
    """A table from op to the local derivative it emits (see the module docstring)."""

    name: str
    norm: Callable[[NormOp], list[Block]]
    activation: Callable[[Callable[[torch.Tensor], torch.Tensor], torch.Tensor], torch.Tensor]
    softmax: Callable[[SoftmaxOp], list[Block]]
    linear: Callable[[Matmul, torch.Tensor, torch.Tensor], list[Block]]
    bilinear: Callable[[str], tuple[float, float]]
    residual: Callable[[SumOp], list[Block]]
    # every block reads its own position's values and what arrives from later positions; False where
    # a rule normalises over the whole sequence (Chefer's residual sums), which a graph after a cached
    # prefix cannot apply exactly
    positionwise: bool = True


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, and 0 where den = 0."""
    return torch.where(den == 0, 0.0, num / den)  # num / 0 is inf or nan, and replaced


# --------------------------------------------------------------------------- the true Jacobians


def norm_jacobian(op: NormOp) -> list[Block]:
    """x → x̃: I − 11ᵀ/n (LayerNorm); x̃_i → s: x̃_i / (n s); x̃_j → y_j: 1 / s; s → y_j: −x̃_j / s².

    Through the scale node, a norm's Jacobian is a diagonal plus a rank-one term."""
    n = op.x_tilde.shape[-1]
    source = op.centered or op.x
    return _centring(op) + [
        Contract(source, op.scale, "norm", op.layer, Weight(op.x_tilde, 1.0 / (n * op.s))),
        Diag(source, op.y, "norm", op.layer, ((Weight(1.0 / op.s), None),)),
        Spread(op.scale, op.y, "norm", op.layer, Weight(op.x_tilde, -1.0 / op.s**2)),
    ]


def _centring(op: NormOp) -> list[Block]:
    if op.centered is None:
        return []
    one = torch.ones(op.x_tilde.shape[-1], dtype=op.s.dtype, device=op.s.device)
    return [Rank1(op.x, op.centered, "norm", op.layer, Weight(one), Weight(one), Weight(one, -1.0 / one.numel()))]


def activation_derivative(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """f'(x), element-wise, by autograd."""
    with torch.enable_grad():
        leaf = x.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(fn(leaf).sum(), leaf)
    return grad.detach()


def softmax_jacobian(op: SoftmaxOp) -> list[Block]:
    """∂p_k/∂s_j = p_k (δ_jk − p_j): ``J = diag(p) − p pᵀ`` per row, stored as its factors (p itself
    where it is already 0 outside the allowed pairs: no masked copy formed on every pass)."""
    mask = () if op.exact else (op.allowed,)
    a = Weight(op.p, *mask)
    return [Rank1(op.scores, op.pattern, "softmax", op.layer, a, Weight(op.p, *mask, -1.0), a)]


def linear_jacobian(block: Matmul, x: torch.Tensor, y: torch.Tensor) -> list[Block]:
    """A linear map's Jacobian is its weight."""
    return [block]


def bilinear_jacobian(product: str) -> tuple[float, float]:
    """∂(a ∘ b)/∂a is b and ∂(a ∘ b)/∂b is a: factor one on each operand."""
    return 1.0, 1.0


def residual_sum(op: SumOp) -> list[Block]:
    """A sum passes its gradient to every summand unchanged."""
    return [Identity(source, op.target, "residual", op.layer) for source in op.sources]


GRADIENT = RuleSet(
    name="gradient",
    norm=norm_jacobian,
    activation=activation_derivative,
    softmax=softmax_jacobian,
    linear=linear_jacobian,
    bilinear=bilinear_jacobian,
    residual=residual_sum,
)

# --------------------------------------------------------------------------- LRP rules


def norm_scale_constant(op: NormOp) -> list[Block]:
    """The norm as the linear map it is with its scale held constant (AttnLRP's identity rule for
    norms, the LN-rule of CP-LRP and RelP): x → x̃ (centring) → y = x̃ / s, no edge into s."""
    source = op.centered or op.x
    return _centring(op) + [Diag(source, op.y, "norm", op.layer, ((Weight(1.0 / op.s), None),))]


def identity_rule(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The identity rule for an element-wise ``y = f(x)``: relevance passes unchanged, so the local
    weight is ``f(x) / x`` (0 where x = 0; AttnLRP eq. 9)."""
    return _ratio(fn(x), x)


def softmax_constant(op: SoftmaxOp) -> list[Block]:
    """The attention pattern held constant (CP-LRP, RelP's AH-rule): no scores → pattern edge."""
    return []


def epsilon_rule(epsilon: float) -> Callable[[Matmul, torch.Tensor, torch.Tensor], list[Block]]:
    """LRP-ε on a linear map ``y = x W + b``: R_x = x ⊙ W (R_y / (y + ε sign y)); as a modified
    gradient ``g_x = W (g_y ⊙ y / (y + ε sign y))``. ε = 0 is gradient × input."""
    if epsilon == 0:
        return linear_jacobian

    def rule(block: Matmul, x: torch.Tensor, y: torch.Tensor) -> list[Block]:
        sign = torch.where(y >= 0, 1.0, -1.0).to(y.dtype)
        return [dataclasses.replace(block, tgt_scale=Weight(_ratio(y, y + epsilon * sign)))]

    return rule


def halves(product: str) -> tuple[float, float]:
    """The uniform rule on every bilinear product: half of the relevance to each operand (AttnLRP eq. 7)."""
    return 0.5, 0.5


def pattern_held_constant(product: str) -> tuple[float, float]:
    """CP-LRP: q·k and the pattern carry nothing, v carries all of pattern · v; the gate of a gated
    MLP held constant, its linear branch carries the product (as the reference implementation);
    likewise SoLU's softmax, so that its input carries x ⊙ softmax(x)."""
    return {"qk": (0.0, 0.0), "pv": (0.0, 1.0), "gate": (0.0, 1.0), "solu": (0.0, 1.0)}[product]


def attn_lrp(epsilon: float = 0.0) -> RuleSet:
    """AttnLRP (Achtibat et al., ICML 2024): norms with the scale held constant, the identity rule
    through activations, the uniform rule on q·k, pattern·v and gate ⊙ linear, softmax by its
    Jacobian (AttnLRP's softmax rule in gradient × input form), LRP-ε on linear maps (ε = 0, as
    the reference implementation ``lxt.efficient`` computes)."""
    if not epsilon >= 0:
        raise GradGraphError(f"epsilon must be a number >= 0, got {epsilon!r}")
    return RuleSet(
        name="attn-lrp" if epsilon == 0 else f"attn-lrp(eps={epsilon:g})",
        norm=norm_scale_constant,
        activation=identity_rule,
        softmax=softmax_jacobian,
        linear=epsilon_rule(epsilon),
        bilinear=halves,
        residual=residual_sum,
    )


ATTN_LRP = attn_lrp()

CP_LRP = RuleSet(
    name="cp-lrp",
    norm=norm_scale_constant,
    activation=identity_rule,
    softmax=softmax_constant,
    linear=linear_jacobian,
    bilinear=pattern_held_constant,
    residual=residual_sum,
)
"""CP-LRP (Ali et al., ICML 2022): AttnLRP's norms and activations, the attention pattern held
constant (no relevance into q and k), v carrying pattern · v whole."""


def relp(pattern_constant: bool = False) -> RuleSet:
    """The rules of Relevance Patching (Rezaei Jafari et al. 2025): the LN-rule (norm scale held
    constant), the identity rule through activations, the half rule on the gated MLP product
    (g/2 + (g/2).detach()), attention as it is, or with the pattern held constant (AH-rule)."""

    def bilinear(product: str) -> tuple[float, float]:
        if product in ("gate", "solu"):
            return 0.5, 0.5
        return pattern_held_constant(product) if pattern_constant else (1.0, 1.0)

    return RuleSet(
        name="relp+ah" if pattern_constant else "relp",
        norm=norm_scale_constant,
        activation=identity_rule,
        softmax=softmax_constant if pattern_constant else softmax_jacobian,
        linear=linear_jacobian,
        bilinear=bilinear,
        residual=residual_sum,
    )


RELP = relp()

# --------------------------------------------------------------------------- Chefer et al. 2021


def passthrough_norm(op: NormOp) -> list[Block]:
    """Chefer et al.: relevance passes a norm unchanged element-wise, R_x = R_y, so the modified
    gradient is ``g_x = (y / x) g_y`` (one diagonal x → y; the centring and scale nodes carry
    nothing). The norm's weight sits in the next linear map, where α1β0 reads the products
    y_i w_i W_ij, exactly the products Chefer's code forms on the norm's output (a norm bias, as
    TransformerLens folds it, belongs to the next map's bias)."""
    y = op.x_tilde / op.s
    return [Diag(op.x, op.y, "norm", op.layer, ((Weight(_ratio(y, op.x_value)), None),))]


def passthrough_softmax(op: SoftmaxOp) -> list[Block]:
    """Chefer et al.: relevance passes the softmax unchanged element-wise: ``g_s = (p / s) g_p``."""
    def ratio(p: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return _ratio(p, torch.where(op.allowed, s, torch.zeros((), dtype=s.dtype, device=s.device)))

    return [Diag(op.scores, op.pattern, "softmax", op.layer, ((Weight(lazily(ratio, op.p, op.s), op.allowed), None),))]


def alpha1_beta0(block: Matmul, x: torch.Tensor, y: torch.Tensor) -> list[Block]:
    """LRP-α1β0 with sign-split inputs (Chefer et al.'s ``Linear.relprop``):
    R_x_i = Σ_j (x⁺_i W⁺_ij + x⁻_i W⁻_ij) R_y_j / Z_j, Z_j = Σ_i x⁺_i W⁺_ij + x⁻_i W⁻_ij (no bias).
    As a modified gradient: ``g_x_i = Σ_j W^{sign x_i}_ij (y_j / Z_j) g_y_j``: W⁺ for positive
    inputs, W⁻ for negative ones (a ``SignSplit`` of two shared-weight maps), scaled per output."""
    positive = dataclasses.replace(block, weight=block.weight.part(+1))
    negative = dataclasses.replace(block, weight=block.weight.part(-1))
    x_c = compact(x)  # per-head copies of one vector: signs once, broadcast
    is_pos, is_neg = (x_c > 0).expand_as(x), (x_c < 0).expand_as(x)
    z = positive.forward(Real, x.clamp(min=0)[None])[0] + negative.forward(Real, x.clamp(max=0)[None])[0]  # [*y]
    scale = Weight(_ratio(y, z))
    return [SignSplit(block.src, block.tgt, block.op, block.layer,
                      dataclasses.replace(positive, tgt_scale=scale), dataclasses.replace(negative, tgt_scale=scale),
                      is_pos, is_neg)]


def normalised_sum(op: SumOp) -> list[Block]:
    """Chefer et al.'s ``Add.relprop``: each summand a_i gets the z-rule share a_i ⊙ R / Z, then the
    shares are rescaled per item so that summand i receives |C_i| / Σ_k |C_k| of Σ R, with
    C_i = Σ a_i ⊙ R / Z. As a modified gradient (R = Z ⊙ g): ``g_i = κ_i g`` with
    κ_i = |C_i| / Σ_k |C_k| · (Σ_k C_k) / C_i and C_i = Σ a_i ⊙ g, a number per item that depends on
    the relevance arriving. Each summand's block is ``Pending``: the builder's one Real backprop
    hands it g, it fixes κ and becomes a diagonal; no second recursion exists."""
    if len(op.sources) == 1:
        return residual_sum(op)

    def freeze_for(i: int) -> Callable[[torch.Tensor], Block]:
        def freeze(value: torch.Tensor) -> Block:
            g = value[0]  # [B, P, d]
            c = torch.stack([(a * g).flatten(1).sum(1) for a in op.inputs])  # [sources, B]
            share = _ratio(c[i].abs(), c.abs().sum(0)) * _ratio(c.sum(0), c[i])
            return Diag(op.sources[i], op.target, "residual", op.layer, ((Weight(share[:, None, None]), None),))

        return freeze

    return [Pending(source, op.target, "residual", op.layer, freeze_for(i)) for i, source in enumerate(op.sources)]


CHEFER2021 = RuleSet(
    name="chefer2021",
    norm=passthrough_norm,
    activation=identity_rule,
    softmax=passthrough_softmax,
    linear=alpha1_beta0,
    bilinear=halves,
    residual=normalised_sum,
    positionwise=False,
)
"""Chefer et al. 2021, the rules Mask-LRP's code uses: α1β0 on linear maps, gradient × input
halved on bilinear products (q·k, pattern · v, and a gated MLP's product), softmax, norms and
activations passing relevance through, residual sums normalised. Rotary rotations keep their
Jacobian (a rotation; Chefer's models have none)."""

RULE_SETS = {rules.name: rules for rules in (GRADIENT, ATTN_LRP, CP_LRP, RELP, relp(True), CHEFER2021)}


def rule_set(rules: RuleSet | str) -> RuleSet:
    """A ``RuleSet``, or one by name: ``gradient``, ``attn-lrp``, ``cp-lrp``, ``relp``, ``relp+ah``,
    ``chefer2021``."""
    if isinstance(rules, RuleSet):
        return rules
    if isinstance(rules, str) and rules in RULE_SETS:
        return RULE_SETS[rules]
    raise GradGraphError(f"unknown rule set {rules!r}; choose one of {sorted(RULE_SETS)} or pass a RuleSet")


__all__ = ["ATTN_LRP", "CHEFER2021", "CP_LRP", "GRADIENT", "RELP", "NormOp", "RuleSet", "SoftmaxOp", "SumOp",
           "attn_lrp", "relp", "rule_set"]
