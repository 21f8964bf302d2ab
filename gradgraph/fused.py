"""A rule set's Real recursion to the inputs in one autograd pass, where the rule set allows it.

``backprop(graph, Real)`` on a rule set's graph gives at every node a modified gradient. When all
that is asked is that value at the inputs (token relevance, the gradient at the embeddings), and
every rule of the set is the true Jacobian, a constant factor on a product's operand, a norm's
scale held constant or the identity rule through an activation, the same recursion is autograd
through the forward from the weights with those changes made in its backward
(``inference.differentiable``): no graph is stored, attention runs in torch's fused kernel and keeps
no pattern, and memory grows linearly with the prompt. Tested equal to the graph's values.

The rule sets it covers (``backward_of``): ``GRADIENT``, ``ATTN_LRP`` (ε = 0), ``CP_LRP``, ``RELP``
and ``relp+ah``, on models the weights forward covers (GPT-2 / Llama layout, no cached prefix, no
head mask). Anything else goes through the graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gradgraph.arch import names
from gradgraph.arch.inference import Backward, differentiable, reader_gradients
from gradgraph.arch.spec import check_supported
from gradgraph.build.record import check_embed, check_metric_value, tokens_and_mask
from gradgraph.errors import GradGraphError
from gradgraph.metrics import AtPosition, prepare
from gradgraph.rules import (RuleSet, activation_derivative, identity_rule, linear_jacobian, norm_jacobian,
                             norm_scale_constant, residual_sum, rule_set, softmax_constant, softmax_jacobian)


@dataclass(frozen=True, eq=False)
class InputValues:
    """One fused pass: the (modified) gradient at each input node and what it multiplies."""

    tokens: torch.Tensor  # [batch, pos]
    attention_mask: torch.Tensor  # [batch, pos]
    grads: dict[str, torch.Tensor]  # input node -> [batch, pos, d_model]
    activations: dict[str, torch.Tensor]  # input node -> [batch, pos, d_model]
    metric_value: torch.Tensor  # [batch]
    cut_sums: dict[str, torch.Tensor]  # residual cut -> [batch]: Σ activation ⊙ value there

    def scores(self) -> torch.Tensor:
        """``[batch, pos]``: Σ over the input nodes and d_model of activation ⊙ value; 0 at padding."""
        total = sum((self.grads[n] * self.activations[n]).sum(-1) for n in self.grads)
        return total * self.attention_mask.to(total.dtype)


def backward_of(rules: RuleSet | str) -> Backward | None:
    """The autograd form of ``rules``' Real recursion, or None where a rule has none (ε > 0, α1β0,
    Chefer's norms, softmax and residual sums, a rule set of one's own)."""
    rules = rule_set(rules)
    held = {norm_jacobian: False, norm_scale_constant: True}.get(rules.norm)
    identity = {activation_derivative: False, identity_rule: True}.get(rules.activation)
    softmax = {softmax_jacobian: True, softmax_constant: False}.get(rules.softmax)
    if None in (held, identity, softmax) or rules.linear is not linear_jacobian or rules.residual is not residual_sum:
        return None
    return Backward(scale_held=held, identity=identity, qk=rules.bilinear("qk") if softmax else (0.0, 0.0),
                    pv=rules.bilinear("pv"), gate=rules.bilinear("gate"))


def covers(model, rules: RuleSet | str, *, head_mask=None, prefix=None) -> bool:
    """Whether ``input_values`` computes ``rules`` on ``model``: a rule set ``backward_of`` knows, the
    weights forward's layout, no head mask and no cached prefix."""
    made = check_supported(model)
    return (head_mask is None and prefix is None and made.from_weights and made.layout == "decoder"
            and backward_of(rules) is not None)


def input_values(model, tokens, metric, *, rules: RuleSet | str, attention_mask: torch.Tensor | None = None,
                 embed: torch.Tensor | None = None, cuts: bool = False) -> InputValues:
    """The value ``backprop(build_graph(...), Real)`` leaves at each input node under ``rules``, from
    one autograd pass (``covers`` must hold); ``cuts``: also Σ activation ⊙ value at every residual
    cut (``attribution.cuts``), for the conservation deltas."""
    if not covers(model, rules):
        raise GradGraphError(f"no fused pass for {rule_set(rules).name} on this model; build_graph covers it")
    made = check_supported(model)
    if isinstance(tokens, torch.Tensor):
        made.check_device(tokens)
    metric = prepare(metric, model)
    token_ids, mask = tokens_and_mask(model, tokens, attention_mask)
    embed = None if embed is None else check_embed(model, embed, token_ids)
    sums: dict[str, torch.Tensor] = {}

    def watch(name: str, tensor: torch.Tensor) -> None:
        if cuts and tensor.requires_grad:
            tensor.register_hook(lambda g, t=tensor.detach(): sums.__setitem__(name, (t * g).flatten(1).sum(1)))

    with torch.enable_grad():
        at = metric.positions(mask) if isinstance(metric, AtPosition) else None  # [batch]: read there only
        logits, inputs = differentiable(made, token_ids, backward_of(rules), embed=embed, watch=watch, positions=at)
        value = check_metric_value(metric(logits, mask) if at is None else metric.of(logits), token_ids.shape[0])
        del logits
        grads = torch.autograd.grad(value.sum(), list(inputs.values()), allow_unused=True)
    grads = {n: torch.zeros_like(x) if g is None else g for (n, x), g in zip(inputs.items(), grads)}
    for name in names.residual_cuts(made.n_layers) if cuts else ():  # no path from the metric: 0
        sums.setdefault(name, torch.zeros_like(value.detach()))
    return InputValues(token_ids, mask, grads, {n: x.detach() for n, x in inputs.items()}, value.detach(), sums)


@dataclass(frozen=True, eq=False)
class ReaderValues:
    """One fused pass: the (modified) gradient at every head's q/k/v input, MLP input and the last
    residual (``grads`` by node name, as the graph names them) and the activations the edge methods
    read (``activations``: ``hook_resid_pre`` of layer 0, each layer's ``z`` and ``mlp_out``)."""

    grads: dict[str, torch.Tensor]
    activations: dict[str, torch.Tensor]


def reader_values(model, tokens, metric, *, rules: RuleSet | str, attention_mask: torch.Tensor | None = None,
                  embed: torch.Tensor | None = None) -> ReaderValues:
    """What ``backprop(build_graph(...), Real, keep=...)`` leaves at every component's input under
    ``rules`` (``covers`` must hold), from one autograd pass and a pass through each norm per layer
    (``inference.reader_gradients``)."""
    if not covers(model, rules):
        raise GradGraphError(f"no fused pass for {rule_set(rules).name} on this model; build_graph covers it")
    made = check_supported(model)
    metric = prepare(metric, model)
    token_ids, mask = tokens_and_mask(model, tokens, attention_mask)
    embed = None if embed is None else check_embed(model, embed, token_ids)
    backward = backward_of(rules)
    reads: dict = {}
    with torch.enable_grad():
        at = metric.positions(mask) if isinstance(metric, AtPosition) else None
        logits, inputs = differentiable(made, token_ids, backward, embed=embed, positions=at, reads=reads)
        value = check_metric_value(metric(logits, mask) if at is None else metric.of(logits), token_ids.shape[0])
        del logits
        wanted = [k for k in reads if k[0] in ("qkv", "normed", "final")]
        grads = dict(zip(wanted, torch.autograd.grad(value.sum(), [reads[k] for k in wanted], allow_unused=True)))
    grads = {k: torch.zeros_like(reads[k]) if g is None else g for k, g in grads.items()}
    out = reader_gradients(made, reads, grads, backward)
    out[names.name("resid_post", made.n_layers - 1)] = grads[("final",)]
    acts = {names.name("resid_pre", 0): sum(x.detach() for x in inputs.values())}
    for layer in range(made.n_layers):
        acts[names.name("z", layer)] = reads[("z", layer)]
        acts[names.name("mlp_out", layer)] = reads[("mlp_out", layer)]
    return ReaderValues(out, acts)


__all__ = ["InputValues", "ReaderValues", "backward_of", "covers", "input_values", "reader_values"]
