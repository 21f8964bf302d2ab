"""The op emitters every layout shares: the ``Assembly`` being built, norms, linear maps, residual
sums, soft caps, and the sublayers made of them (the MLP, the final norm, the logits and the
metric; attention has its own module, ``gradgraph.build.attention``). Each emitter adds its ops'
blocks, as the ``RuleSet`` gives them, and returns the node its output lands on, a named site
(``gradgraph.arch.names``) where later nodes attach."""

from __future__ import annotations

import torch

from gradgraph.arch import lens, names
from gradgraph.arch.features import POST_NORM, soft_cap
from gradgraph.arch.spec import spec
from gradgraph.build.record import Recording
from gradgraph.errors import GradGraphError
from gradgraph.graph import Block, Diag, Identity, Matmul
from gradgraph.rules import NormOp, RuleSet, SoftmaxOp, SumOp
from gradgraph.weights import Lazy, Weight, compact, lazily, model_weights, shared_weight


class Assembly:
    """The nodes and blocks assembled so far, and what they are built from."""

    def __init__(self, recording: Recording, rules: RuleSet, head_mask: torch.Tensor | None):
        self.rec, self.rules, self.head_mask = recording, rules, head_mask
        self.model, self.spec = recording.model, spec(recording.model)
        self.cfg = self.spec.cfg
        self.valid = recording.attention_mask.bool()  # [B, P]
        self.unpadded = bool(self.valid.all())  # the masks then only repeat what −inf made 0 in the patterns
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.order: list[str] = []
        self.blocks: list[Block] = []
        self.stored: dict[str, torch.Tensor] = {}
        self.weights = model_weights(self.model)
        self.prefix = 0 if recording.prefix is None else len(recording.prefix)
        self.encoder = self.spec.layout == "encoder"  # post-LN blocks around the residual sums, attention both ways
        self.masks: dict[int | None, tuple] = {}  # attention masks by local window (None: global)
        self.regions: list = []  # a long prompt's attention, run a chunk of query rows at a time (gradgraph.chunked)
        self.copies: list[tuple[str, int, tuple[str, ...]]] = []  # norms on per-head copies (GradGraph.copies)

    def node(self, name: str, tensor: torch.Tensor | None = None) -> str:
        if tensor is None:
            if name not in self.rec.activations:
                raise GradGraphError(f"hook point {name} did not fire; this model's layout is not supported")
            tensor = self.rec.activations[name].detach()
        self.shapes[name] = tuple(tensor.shape)
        self.order.append(name)
        self.stored[name] = tensor
        return name

    def add(self, blocks: list[Block]) -> None:
        self.blocks += blocks

    def derived(self, op: str, key: tuple, make) -> list[Block]:
        """``make()``'s blocks, made once per recording, rule set and op (no head mask enters them)."""
        key = (self.rules, op) + key
        if key not in self.rec.derived:
            self.rec.derived[key] = make()
        return self.rec.derived[key]

    def add_derived(self, op: str, key: tuple, make) -> None:
        self.add(self.derived(op, key, make))

    def shared(self, key: tuple, make) -> Weight:
        """A model matrix (with a norm's weight folded in), shared by every graph of the model."""
        return shared_weight(self.weights, key, make)


def nonzero(blocks: list[tuple[float, object]]) -> list[Block]:
    """The blocks whose rule factor is not zero (a factor 0 means the operand carries nothing)."""
    return [make() for factor, make in blocks if factor != 0]


def norm_weight(module) -> torch.Tensor | None:
    return module.w.detach() if hasattr(module, "w") else None


def norm(asm: Assembly, prefix: str, x: str, layer: int | None, module, firing: str | None = None) -> str:
    """The norm ``module`` on node ``x``; returns ``hook_normalized``'s node (``x`` itself when the
    model has no norm there)."""
    kind = lens.norm_kind(module)
    if kind is None:
        return x
    centered = None
    x_tilde = asm.stored[x]
    if kind in ("LN", "LNPre"):
        one = compact(x_tilde)  # per-head copies: centred once
        x_tilde = (one - one.mean(-1, keepdim=True)).expand_as(x_tilde)
        centered = asm.node(names.name(f"{prefix}_centered", layer, firing), x_tilde)
    scale = asm.node(names.name(f"{prefix}_scale", layer, firing))
    y = asm.node(names.name(f"{prefix}_normalized", layer, firing))
    # per-head copies of one vector are handed over as that vector: every weight made of them is one
    # per copy too, and a pass can go through the norm once for all copies (``GradGraph.copies``)
    asm.add_derived("norm", (x, y), lambda: asm.rules.norm(
        NormOp(x, centered, scale, y, compact(asm.stored[x]), compact(x_tilde), compact(asm.stored[scale]), layer)))
    return y


def norm_out(asm: Assembly, prefix: str, x: str, layer: int, module, out: str) -> str:
    """A norm whose weight no linear map takes up (after attention or the MLP, on q and k, SoLU's):
    ``out = normalized ⊙ w + b``, a diagonal; returns ``out``'s node (its tensor recorded or formed)."""
    y = norm(asm, prefix, x, layer, module)
    w = norm_weight(module)
    if out in asm.rec.activations:
        asm.node(out)
    else:
        bias = module.b.detach() if hasattr(module, "b") else 0.0
        asm.node(out, asm.stored[y] if w is None else asm.stored[y] * w + bias)
    if w is None:
        asm.add([Identity(y, out, "copy" if y == x else "norm", layer)])
    else:
        asm.add([Diag(y, out, "norm", layer, ((Weight(w), None),))])
    return out


def linear(asm: Assembly, src: str, tgt: str, layer: int | None, weight: Weight, src_pattern: str,
            tgt_pattern: str, axes: dict) -> str:
    block = Matmul(src, tgt, "linear", layer, weight, True, src_pattern, tgt_pattern, axes)
    asm.add_derived("linear", (src, tgt), lambda: asm.rules.linear(block, asm.stored[src], asm.stored[tgt]))
    return tgt


def residual_sum(asm: Assembly, sources: tuple[str, ...], target: str, layer: int | None) -> None:
    asm.add(asm.rules.residual(SumOp(sources, target, tuple(asm.stored[n] for n in sources), layer)))


def norms_around(asm: Assembly, block, which: str) -> tuple:
    """``(norm before, norm after, the latter's node prefix)`` for attention (``which="1"``) or the
    MLP (``"2"``): pre-norm ``ln1``/``ln2`` (and Gemma 2's ``ln1_post``/``ln2_post`` after); OLMo-2's
    ``ln1``/``ln2`` after only; none for an encoder, whose norms sit after the residual sums."""
    own = getattr(block, f"ln{which}", None)
    if asm.encoder:
        return None, None, None
    if asm.cfg.original_architecture in POST_NORM:
        return None, own, f"ln{which}"
    return own, getattr(block, f"ln{which}_post", None), f"ln{which}_post"


def written(asm: Assembly, src: str, layer: int, weight: Weight, rows: tuple, out: str, raw: str, after,
             prefix: str | None, raw_value) -> str:
    """A sublayer's output map ``src → out`` (``hook_attn_out``, ``hook_mlp_out``): straight, or into
    ``raw`` (its tensor ``raw_value()``) and through the norm ``after`` when the model has one there."""
    if after is None:
        return linear(asm, src, asm.node(out), layer, weight, *rows)
    node = asm.node(raw, raw_value())
    linear(asm, src, node, layer, weight, *rows)
    return norm_out(asm, prefix, node, layer, after, out)


def soft_capped(rules: RuleSet, raw: str, capped: str, layer: int | None, cap: float, x: torch.Tensor | Lazy,
                mask: torch.Tensor | None = None) -> Diag:
    """``capped = cap · tanh(raw / cap)`` on ``raw``'s tensor ``x``, an element-wise function
    (Gemma 2's scores and logits)."""
    fn = lambda t: cap * torch.tanh(t / cap)  # noqa: E731
    slope = lazily(lambda t: rules.activation(fn, t), x)
    return Diag(raw, capped, "activation", layer, ((Weight(slope) if mask is None else Weight(slope, mask), None),))


def mlp(asm: Assembly, layer: int, mlp_in: str) -> str:
    """ln2, the (gated) MLP and its output (a norm after it); returns mlp_out's node."""
    cfg, block = asm.cfg, asm.spec.blocks[layer]
    mlp = block.mlp
    B, P = asm.valid.shape
    before, after, after_prefix = norms_around(asm, block, "2")  # an encoder's MLP reads ln1's output
    y = mlp_in if before is None else norm(asm, "ln2", mlp_in, layer, before)
    w2 = None if before is None else norm_weight(before)

    def folded(matrix):
        return lambda: matrix.detach() if w2 is None else w2[:, None] * matrix.detach()

    rows = ("b p d -> 1 (b p) d", "b p m -> 1 (b p) m", dict(b=B, p=P))
    pre = asm.node(names.name("mlp_pre", layer))
    W_pre = asm.shared(("W_gate" if cfg.gated_mlp else "W_in", layer),
                       lambda: folded(mlp.W_gate if cfg.gated_mlp else mlp.W_in)()[None])
    linear(asm, y, pre, layer, W_pre, *rows)
    pre_act = asm.stored[pre]
    post = names.name("mlp_post", layer)
    if cfg.act_fn == "solu_ln":
        _solu(asm, layer, pre, mlp, post)
    elif cfg.gated_mlp:
        slope = asm.rules.activation(mlp.act_fn, pre_act)
        lin = asm.node(names.name("mlp_pre_linear", layer))
        linear(asm, y, lin, layer, asm.shared(("W_in", layer), lambda: folded(mlp.W_in)()[None]), *rows)
        asm.node(post)
        f_gate, f_lin = asm.rules.bilinear("gate")
        asm.add(nonzero([
            (f_gate, lambda: Diag(pre, post, "activation", layer, ((Weight(slope, asm.stored[lin], f_gate), None),))),
            (f_lin, lambda: Diag(lin, post, "activation", layer, ((Weight(mlp.act_fn(pre_act), f_lin), None),))),
        ]))
    else:
        slope = asm.rules.activation(mlp.act_fn, pre_act)
        asm.node(post)
        asm.add([Diag(pre, post, "activation", layer, ((Weight(slope), None),))])
    W_out = asm.shared(("W_out", layer), lambda: mlp.W_out.detach()[None])
    return written(asm, post, layer, W_out, ("b p m -> 1 (b p) m", "b p d -> 1 (b p) d", dict(b=B, p=P)),
                    names.name("mlp_out", layer), names.name("mlp_raw", layer), after, after_prefix,
                    lambda: asm.stored[post] @ mlp.W_out.detach() + mlp.b_out.detach())


def _solu(asm: Assembly, layer: int, pre: str, mlp, post: str) -> None:
    """SoLU with its LayerNorm: ``mid = pre ⊙ softmax(pre)`` (a softmax over the MLP's width, then a
    product of two operands, ``"solu"`` for the rule set's bilinear factors), ``post = LN(mid)``."""
    x = asm.stored[pre]
    soft = asm.node(names.name("mlp_softmax", layer), torch.softmax(x, -1))
    everywhere = torch.ones(x.shape[:-1] + (1,), dtype=torch.bool, device=x.device)  # [B, P, 1]
    asm.add_derived("softmax", (pre, soft), lambda: asm.rules.softmax(
        SoftmaxOp(pre, soft, asm.stored[soft], everywhere, layer, x)))
    mid = asm.node(names.name("mlp_mid", layer))
    f_soft, f_x = asm.rules.bilinear("solu")
    asm.add(nonzero([
        (f_soft, lambda: Diag(soft, mid, "activation", layer, ((Weight(x, f_soft), None),))),
        (f_x, lambda: Diag(pre, mid, "activation", layer, ((Weight(asm.stored[soft], f_x), None),))),
    ]))
    norm_out(asm, "mlp_ln", mid, layer, mlp.ln, post)


def final_norm(asm: Assembly, resid: str) -> str:
    """ln_final into ``unembed.hook_in``; returns its node."""
    y = norm(asm, "ln_final", resid, None, asm.spec.final_norm) if asm.cfg.normalization_type else resid
    unembed_in = asm.node(names.name("unembed_in"))
    wf = norm_weight(asm.spec.final_norm) if asm.cfg.normalization_type else None
    if wf is None:
        asm.add([Identity(y, unembed_in, "linear" if y != resid else "copy", None)])
    else:  # y * w + b
        asm.add([Diag(y, unembed_in, "linear", None, ((Weight(wf), None),))])
    return unembed_in


def unembed(asm: Assembly, unembed_in: str) -> None:
    """The logits the metric reads (soft-capped), and the metric."""
    B, P = asm.valid.shape
    ids = asm.rec.logit_ids
    logits = asm.node(names.name("logits"))
    W_U = Weight(asm.model.W_U.detach()[:, ids][None])
    linear(asm, unembed_in, logits, None, W_U, "b p d -> 1 (b p) d", "b p v -> 1 (b p) v", dict(b=B, p=P))
    cap = soft_cap(asm.cfg.output_logits_soft_cap)
    if cap is not None:
        capped = asm.node(names.name("logits_capped"))
        asm.add([soft_capped(asm.rules, logits, capped, None, cap, asm.stored[logits])])
        logits = capped
    metric = asm.node(names.name("metric"), asm.rec.metric_value)
    g = asm.rec.grad_logits.reshape(B, -1, 1)  # [B, P * V', 1]
    asm.add([Matmul(logits, metric, "metric", None, Weight(g), True, "b p v -> b 1 (p v)", "b -> b 1 1",
                    dict(b=B, p=P))])


__all__ = ["Assembly", "attention", "final_norm", "linear", "mlp", "norm", "norm_out", "norm_weight",
           "residual_sum", "unembed"]
