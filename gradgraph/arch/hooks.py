"""The only module that adds hooks: scoped recording of activations and scoped replacement of
activations (node and hook names: ``gradgraph.arch.names``).

Every hook lives inside a ``with`` block and is removed on leaving it, also when it raised.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from contextlib import ExitStack, contextmanager
from typing import Callable, Iterator, Mapping

import torch

from gradgraph.arch import lens
from gradgraph.arch.lens import Model
from gradgraph.arch.names import SPLIT_FIRINGS, name
from gradgraph.errors import GradGraphError


@contextmanager
def recording(
    model: Model, *, keep_grad: bool = False, names: set[str] | None = None, skip: set[str] = frozenset()
) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Record every firing of every hook point (or of ``names``), except those in ``skip``, inside
    the block: ``{hook name: [tensor, ...]}``.

    With ``keep_grad``, recorded tensors retain their gradients (for autograd references; with
    frozen weights, the embeddings become the leaves that gradients flow to). The
    hooks are removed on leaving the block, also when it raised.
    """
    store: dict[str, list[torch.Tensor]] = defaultdict(list)

    def record(tensor: torch.Tensor, hook) -> None:
        if not tensor.is_floating_point():  # token ids (a bridge's embed.hook_in)
            return
        if keep_grad and not tensor.requires_grad and tensor.grad_fn is None:
            tensor.requires_grad_(True)  # an input (frozen weights): gradients start here
        if keep_grad and tensor.requires_grad:
            tensor.retain_grad()
        store[lens.hook_name(model, hook.name)].append(tensor if keep_grad else tensor.detach())

    def wanted(hook_name: str) -> bool:
        node = lens.hook_name(model, hook_name)
        return node not in skip and (names is None or node in names)

    with ExitStack() as hooked:
        with warnings.catch_warnings():  # a bridge names the hook points it gates off (hook_result): not news
            warnings.filterwarnings("ignore", message="hooks: skipped", category=UserWarning)
            hooked.enter_context(model.hooks(fwd_hooks=[(wanted, record)], reset_hooks_end=True))
        yield store
    lens.complete_firings(model, store)


Replacement = Callable[[torch.Tensor], torch.Tensor] | torch.Tensor


@contextmanager
def replacing(model: Model, replacements: Mapping[str, Replacement]) -> Iterator[None]:
    """Inside the block, the activation at each hook point ``name`` is replaced: by a tensor of its
    shape (e.g. ``hook_embed`` by interpolated embeddings), or by ``fn(activation)`` (an ablated or
    patched head). The only place in the package that swaps activations; hooks go on leaving."""
    unknown = [hook for hook in replacements if hook not in model.hook_dict]
    if unknown:
        raise GradGraphError(f"no hook point named {unknown[0]!r} on this model")

    def make(hook_name: str, replacement: Replacement):
        def replace(activation: torch.Tensor, hook) -> torch.Tensor:
            if not isinstance(replacement, torch.Tensor):
                return replacement(activation)
            if replacement.shape != activation.shape:
                raise GradGraphError(
                    f"the replacement for {hook_name} has shape {tuple(replacement.shape)}, the activation "
                    f"{tuple(activation.shape)}"
                )
            return replacement.to(activation.dtype)

        return replace

    hooks = [(hook_name, make(hook_name, r)) for hook_name, r in replacements.items()]
    with model.hooks(fwd_hooks=hooks, reset_hooks_end=True):
        yield


@contextmanager
def plain_forward(model: Model) -> Iterator[None]:
    """Inside the block the model runs without per-q/k/v copies of the residual stream and without
    ``hook_mlp_in`` (what recording needs, and what makes a forward ~25 % slower); for forwards that
    read only outputs. The settings are restored on leaving, also when it raised."""
    split, mlp_in = model.cfg.use_split_qkv_input, model.cfg.use_hook_mlp_in
    model.set_use_split_qkv_input(False)
    if not model.cfg.attn_only:  # TransformerLens refuses the flag on attention-only models
        model.set_use_hook_mlp_in(False)
    try:
        yield
    finally:
        model.set_use_split_qkv_input(split)
        if not model.cfg.attn_only:
            model.set_use_hook_mlp_in(mlp_in)


def final_residual(model: Model, inputs: torch.Tensor, *, start_at_layer: int | None = None) -> torch.Tensor:
    """The residual stream after the last layer, before ``ln_final``, of ``model(inputs)`` (tokens, or
    a residual stream when starting at a layer). 3.9 stops there (``stop_at_layer=n_layers``); a
    bridge goes on to the logits, so its last ``hook_resid_post`` is read on the way (kept in autograd)."""
    n = model.cfg.n_layers
    if lens.stops_after_last_layer(model):
        return model(inputs, start_at_layer=start_at_layer, stop_at_layer=n)
    kept: list[torch.Tensor] = []
    with model.hooks(fwd_hooks=[(name("resid_post", n - 1), lambda tensor, hook: kept.append(tensor))],
                     reset_hooks_end=True):
        model(inputs, start_at_layer=start_at_layer)
    return kept[-1]


def node_firings(store: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Recorded tensors by node name: repeated firings get their ``:q``/``:k``/``:v`` suffix."""
    out: dict[str, torch.Tensor] = {}
    for hook, tensors in store.items():
        if len(tensors) == 1:
            out[hook] = tensors[0]
        elif len(tensors) == len(SPLIT_FIRINGS):
            for firing, tensor in zip(SPLIT_FIRINGS, tensors):
                out[f"{hook}:{firing}"] = tensor
        else:
            raise RuntimeError(f"hook {hook} fired {len(tensors)} times in one forward pass")
    return out
