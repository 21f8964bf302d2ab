"""Rule sets: which local derivative block the graph builder emits for each op.

Rules change the graph, never the semiring or the recursion (DESIGN.md). The builder
(``gradgraph.build``) walks the model and, at every op, asks the rule set for that op's blocks:

- ``norm(NormOp) -> blocks``: a LayerNorm / RMSNorm ``y = x̃ / s``, ``s = sqrt(mean(x̃²) + ε)``
  (LayerNorm centres first, ``x̃ = x − mean(x)``);
- ``activation(f, x) -> diagonal``: the local derivative of an element-wise ``y = f(x)``;
- ``softmax(SoftmaxOp) -> blocks``: attention scores → pattern, row by row;
- ``linear(block, x) -> blocks``: a linear map, handed as its true-Jacobian ``Matmul`` block and
  its input ``x``;
- ``bilinear(product) -> (left factor, right factor)``: the factor on each operand's block of a
  bilinear product: ``"qk"`` (q·k → scores), ``"pv"`` (pattern · v → z), ``"gate"``
  (act(gate) ⊙ linear → the gated MLP's hidden state);
- ``residual(sources, target, layer) -> blocks``: a residual sum.

Copies (the per-head copies of the residual stream, the MLP's read of it), rotary rotations and the
metric's own derivative are the same under every rule set. ``GRADIENT`` gives the true Jacobians;
``backprop(graph, Real)`` on its graph is the gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from gradgraph.graph import Block, Contract, Diag, Identity, Matmul, Rank1, Spread
from gradgraph.weights import Weight


@dataclass(frozen=True, eq=False)
class NormOp:
    """One firing of a norm: node names and what the forward pass recorded."""

    x: str  # the input node
    centered: str | None  # x̃'s node (LayerNorm) or None (RMSNorm: x̃ = x)
    scale: str  # s [..., 1]
    y: str  # y = x̃ / s
    x_tilde: torch.Tensor  # [..., n]
    s: torch.Tensor  # [..., 1]
    layer: int | None


@dataclass(frozen=True, eq=False)
class SoftmaxOp:
    """An attention softmax: ``pattern[b, h, q, :] = softmax(scores[b, h, q, :])`` over allowed keys."""

    scores: str
    pattern: str
    p: torch.Tensor  # [batch, head, query, key]
    allowed: torch.Tensor  # [batch, 1, query, key] bool: causal and not padding
    layer: int


@dataclass(frozen=True)
class RuleSet:
    """A table from op to the local derivative it emits (see the module docstring)."""

    name: str
    norm: Callable[[NormOp], list[Block]]
    activation: Callable[[Callable[[torch.Tensor], torch.Tensor], torch.Tensor], torch.Tensor]
    softmax: Callable[[SoftmaxOp], list[Block]]
    linear: Callable[[Matmul, torch.Tensor], list[Block]]
    bilinear: Callable[[str], tuple[float, float]]
    residual: Callable[[tuple[str, ...], str, int | None], list[Block]]


# --------------------------------------------------------------------------- the true Jacobians


def norm_jacobian(op: NormOp) -> list[Block]:
    """x → x̃: I − 11ᵀ/n (LayerNorm); x̃_i → s: x̃_i / (n s); x̃_j → y_j: 1 / s; s → y_j: −x̃_j / s².

    Through the scale node, a norm's Jacobian is a diagonal plus a rank-one term."""
    n = op.x_tilde.shape[-1]
    blocks: list[Block] = []
    source = op.x
    if op.centered is not None:
        one = torch.ones(n, dtype=op.s.dtype, device=op.s.device)
        blocks.append(Rank1(op.x, op.centered, "norm", op.layer, Weight(one), Weight(one), Weight(one, -1.0 / n)))
        source = op.centered
    blocks += [
        Contract(source, op.scale, "norm", op.layer, Weight(op.x_tilde, 1.0 / (n * op.s))),
        Diag(source, op.y, "norm", op.layer, ((Weight(1.0 / op.s), None),)),
        Spread(op.scale, op.y, "norm", op.layer, Weight(op.x_tilde, -1.0 / op.s**2)),
    ]
    return blocks


def activation_derivative(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """f'(x), element-wise, by autograd."""
    with torch.enable_grad():
        leaf = x.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(fn(leaf).sum(), leaf)
    return grad.detach()


def softmax_jacobian(op: SoftmaxOp) -> list[Block]:
    """∂p_k/∂s_j = p_k (δ_jk − p_j): ``J = diag(p) − p pᵀ`` per row, stored as its factors."""
    a = Weight(op.p, op.allowed)
    return [Rank1(op.scores, op.pattern, "softmax", op.layer, a, Weight(op.p, op.allowed, -1.0), a)]


def linear_jacobian(block: Matmul, x: torch.Tensor) -> list[Block]:
    """A linear map's Jacobian is its weight."""
    return [block]


def bilinear_jacobian(product: str) -> tuple[float, float]:
    """∂(a ∘ b)/∂a is b and ∂(a ∘ b)/∂b is a: factor one on each operand."""
    return 1.0, 1.0


def residual_sum(sources: tuple[str, ...], target: str, layer: int | None) -> list[Block]:
    """A sum passes its gradient to every summand unchanged."""
    return [Identity(source, target, "residual", layer) for source in sources]


GRADIENT = RuleSet(
    name="gradient",
    norm=norm_jacobian,
    activation=activation_derivative,
    softmax=softmax_jacobian,
    linear=linear_jacobian,
    bilinear=bilinear_jacobian,
    residual=residual_sum,
)

__all__ = ["GRADIENT", "NormOp", "RuleSet", "SoftmaxOp"]
