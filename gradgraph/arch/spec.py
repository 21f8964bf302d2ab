"""``ModelSpec``: what gradgraph reads of a model, gathered once per model.

The config in 3.9's meaning (``lens.config``), each layer's weights under 3.9's names
(``lens.block``: on a bridge, with its rotary tables), the final norm, the layout (decoder or
encoder), the features beyond the GPT-2 / Llama layout, what gradgraph cannot cover, the dtype and
the device. ``spec(model)`` builds it on first use and again whenever a parameter of the model
changes (identity, version, dtype or device; ``weights._fingerprint``) or a switch of its config is
flipped (``use_attn_result``, say), so that a 30-layer bridge
builds its rotary tables once, not once per layer per graph.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from gradgraph.arch import lens, names
from gradgraph.arch.features import layout_features, unsupported_features
from gradgraph.arch.lens import Model
from gradgraph.errors import GradGraphError
from gradgraph.weights import _fingerprint


@dataclass(frozen=True, eq=False)
class ModelSpec:
    """The facts of one model (frozen: rebuilt, not edited, when the model changes). It holds the
    model weakly: a spec kept by the per-model cache must not keep its model alive."""

    model_ref: weakref.ReferenceType
    cfg: object  # lens.config(model): the fields gradgraph reads, in TransformerLens 3.9's meaning
    blocks: tuple  # lens.block(model, layer) per layer (on 3.9 the blocks themselves)
    final_norm: object | None  # the norm before the unembedding (None: the model has none; an encoder)
    layout: str  # "decoder" or "encoder" (build.assemble.LAYOUTS)
    features: tuple[str, ...]  # features.layout_features(cfg): beyond the GPT-2 / Llama layout
    problems: tuple[str, ...]  # features.unsupported_features(model): what the graph builder does not cover
    dtype: torch.dtype  # what the model computes in
    device: torch.device  # where its weights are
    fingerprint: tuple

    @property
    def model(self) -> Model:
        return self.model_ref()

    @property
    def n_layers(self) -> int:
        return self.cfg.n_layers

    @property
    def n_key_value_heads(self) -> int:
        return self.cfg.n_key_value_heads or self.cfg.n_heads

    @property
    def from_weights(self) -> bool:
        """Whether ``inference``'s forward from the weights covers the model (no problem, no feature
        beyond the GPT-2 / Llama layout); otherwise its passes run TransformerLens' forward with hooks."""
        return not self.problems and not self.features

    def check_device(self, tensor: torch.Tensor, what: str = "tokens") -> torch.Tensor:
        """``tensor`` if it lies on the model's device, else a ``GradGraphError`` saying so."""
        if isinstance(tensor, torch.Tensor) and tensor.device != self.device:
            raise GradGraphError(f"the {what} are on {tensor.device}, the model on {self.device}: move them "
                                 f"(tensor.to('{self.device}')), or the model (model.to(...))")
        return tensor


# the config switches a user may flip on a loaded model (the rest of a config is its shape)
_FLAGS = ("use_split_qkv_input", "use_hook_mlp_in", "use_attn_result", "ungroup_grouped_query_attention",
          "use_attention_sinks", "use_local_attn", "output_logits_soft_cap", "attn_scores_soft_cap")

_SPECS: "weakref.WeakKeyDictionary[Model, ModelSpec]" = weakref.WeakKeyDictionary()


def spec(model: Model) -> ModelSpec:
    """The ``ModelSpec`` of ``model``, built once and again after any parameter changed;
    ``GradGraphError`` when gradgraph cannot read the model at all (``lens.check_model``)."""
    lens.check_model(model)
    fingerprint = (_fingerprint(model), tuple(getattr(model.cfg, flag, None) for flag in _FLAGS))
    known = _SPECS.get(model)
    if known is not None and known.fingerprint == fingerprint:
        return known
    cfg = lens.config(model)
    encoder = names.is_encoder(cfg)  # post-norm blocks: no norm before the unembedding
    made = ModelSpec(model_ref=weakref.ref(model), cfg=cfg,
                     blocks=tuple(lens.block(model, layer) for layer in range(cfg.n_layers)),
                     final_norm=lens.final_norm(model) if cfg.normalization_type and not encoder else None,
                     layout="encoder" if encoder else "decoder",
                     features=tuple(layout_features(cfg)), problems=tuple(unsupported_features(model)),
                     dtype=lens.dtype(model), device=model.W_E.device, fingerprint=fingerprint)
    _SPECS[model] = made
    return made


def check_supported(model: Model) -> ModelSpec:
    """``model``'s spec, or ``GradGraphError`` naming what the graph builder does not cover in it."""
    made = spec(model)
    if made.problems:
        raise GradGraphError("build_graph does not cover this model's " + "; ".join(made.problems)
                             + " (the families it covers: README, 'Model families')")
    if not (model.cfg.use_split_qkv_input and (model.cfg.use_hook_mlp_in or model.cfg.attn_only)):
        raise GradGraphError(
            "build_graph needs model.set_use_split_qkv_input(True) and model.set_use_hook_mlp_in(True) "
            "(gradgraph.arch.models.set_flags sets them, and gradgraph.load_model and tiny_model call it)"
        )
    return made


__all__ = ["ModelSpec", "check_supported", "spec"]
