"""The one module that knows which TransformerLens is installed: 3.9 (``HookedTransformer``,
``HookedEncoder``) or 4.x (``TransformerBridge`` around a Hugging Face model, in compatibility mode).

Everything else in gradgraph reads a model through what this module gives:

- ``config(model)``: the model's config with the fields gradgraph reads in 3.9's meaning (a
  bridge's ``original_architecture``, ``rotary_dim``, ``dtype`` and folded norm kinds filled in);
- ``block(model, layer)`` / ``final_norm(model)``: a layer's weights under 3.9's attribute names
  (``attn.W_Q``, ``attn.b_Q``, ``attn.rotary_cos``, ``attn.attn_scale``, ``mlp.W_in``, ``ln1.w``, …;
  on a bridge, biases it lacks are zeros and rotary tables come from the model's own rotary module);
- ``norm_kind(module)``: ``"LN"``, ``"LNPre"``, ``"RMS"``, ``"RMSPre"`` or None;
- ``hook_name`` / ``complete_firings``: recorded hook firings under 3.9's hook names and firing
  counts (a bridge fires ``blocks.L.hook_in`` for ``hook_resid_pre`` and its ``ln1`` once, not per
  q/k/v input);
- ``wrap_causal_lm(hf_model, tokenizer, folder)``: a Hugging Face causal LM as the installed
  TransformerLens' model, with HookedTransformer's weight processing (fold_ln, centring).

A bridge's hook points are observation copies in places (``hook_q``/``k``/``v``/``z``, the norms'
``hook_scale``/``hook_normalized``): their values are right but no gradient reaches them, and its
``hook_mlp_in`` is the residual stream itself (its gradient includes the skip's). ``gradient_points``
says which hook points carry 3.9's gradient on a bridge.
"""

from __future__ import annotations

import copy
import importlib.metadata
import math
import tempfile
import warnings
from types import SimpleNamespace

import torch

from gradgraph.arch import names
from gradgraph.arch.rotary import rotate
from gradgraph.errors import GradGraphError

VERSION = importlib.metadata.version("transformer-lens")
MAJOR = int(VERSION.split(".")[0])

if MAJOR < 4:
    from transformer_lens import HookedEncoder, HookedTransformer, HookedTransformerConfig

    TransformerBridge = None
    MODEL_TYPES: tuple[type, ...] = (HookedTransformer, HookedEncoder)
else:
    from transformer_lens.model_bridge import TransformerBridge

    HookedEncoder = HookedTransformer = HookedTransformerConfig = None
    MODEL_TYPES = (TransformerBridge,)

# what gradgraph's functions take: a HookedTransformer or HookedEncoder (3.9), a TransformerBridge (4.x)
Model = torch.nn.Module

# the Hugging Face architectures whose bridges this module has been checked on (hook names, folded
# weights, rotary tables): Real = autograd, tests/test_versions.py (Pythia's bridge fires no hook_rot_q/k)
BRIDGE_ARCHITECTURES = {"LlamaForCausalLM", "GPT2LMHeadModel", "GPTNeoXForCausalLM"}

# the kinds of hook point (``names.name``) whose gradient on a bridge is 3.9's, in every layer (the
# rest are observation copies, or, for hook_mlp_in, the residual stream before its split into MLP and skip)
GRADIENT_KINDS = ("resid_pre", "q_input", "k_input", "v_input", "attn_scores", "pattern", "attn_out", "resid_mid",
                  "mlp_pre", "mlp_pre_linear", "mlp_post", "mlp_out", "resid_post")


def gradient_points(model) -> set[str]:
    """The hook points of ``model`` whose autograd gradient is 3.9's: the input embeddings' and
    ``GRADIENT_KINDS`` in every layer (on 3.9 every hook point's is, and these are among them)."""
    layers = range(model.cfg.n_layers)
    return set(names.inputs(model)) | {names.name(kind, layer) for kind in GRADIENT_KINDS for layer in layers}


def is_bridge(model) -> bool:
    """Whether ``model`` is a TransformerLens 4 ``TransformerBridge``."""
    return TransformerBridge is not None and isinstance(model, TransformerBridge)


def is_hooked_encoder(model) -> bool:
    """Whether ``model`` is a TransformerLens 3.9 ``HookedEncoder`` (BERT)."""
    return HookedEncoder is not None and isinstance(model, HookedEncoder)


def model_problems(model) -> list[str]:
    """What stops gradgraph from reading ``model`` (empty: nothing)."""
    if not isinstance(model, MODEL_TYPES):
        kinds = " or ".join(f"transformer_lens.{t.__name__}" for t in MODEL_TYPES)
        return [f"a {type(model).__name__}, not a {kinds} (TransformerLens {VERSION} is installed)"]
    if not is_bridge(model):
        return []
    problems = []
    if not getattr(model, "compatibility_mode", False):
        problems.append("a TransformerBridge without compatibility mode (call model.enable_compatibility_mode(); "
                        "gradgraph.arch.models.set_flags does)")
    architecture = architecture_of(model.cfg)
    if architecture not in BRIDGE_ARCHITECTURES:
        problems.append(f"a TransformerBridge of architecture {architecture} (the bridges gradgraph reads: "
                        f"{', '.join(sorted(BRIDGE_ARCHITECTURES))}; on TransformerLens 3.9 it covers more)")
    if not all(hasattr(model, f) for f in ("set_use_split_qkv_input", "set_use_hook_mlp_in")):
        problems.append("a TransformerBridge without split q/k/v inputs (set_use_split_qkv_input)")
    return problems


def check_model(model) -> None:
    """Raise ``GradGraphError`` naming what gradgraph cannot read in ``model``."""
    problems = model_problems(model)
    if problems:
        raise GradGraphError("gradgraph cannot read " + "; ".join(problems))


# --------------------------------------------------------------------------- configuration


def architecture_of(cfg) -> str | None:
    """The Hugging Face architecture name (3.9: ``original_architecture``; 4.x: ``architecture``)."""
    return getattr(cfg, "original_architecture", None) or getattr(cfg, "architecture", None)


def config(model):
    """``model.cfg`` with the fields gradgraph reads in their 3.9 meaning. On 3.9 the config itself;
    on a bridge a copy (flags such as ``use_split_qkv_input`` are read from ``model.cfg``)."""
    cfg = getattr(model, "cfg", model)
    if not is_bridge(model):
        return cfg
    out = copy.copy(cfg)
    out.original_architecture = architecture_of(cfg)
    out.dtype = model.W_E.dtype
    if cfg.positional_embedding_type == "rotary" and not cfg.rotary_dim:
        out.rotary_dim = _rotary_tables(model, model.W_E, 1)[0].shape[-1]  # partial rotary (Pythia): fewer
    if cfg.normalization_type in ("LN", "RMS") and _folded(model):
        out.normalization_type = cfg.normalization_type + "Pre"  # as 3.9's fold_ln leaves it
    return out


def _folded(model) -> bool:
    """Whether every norm's weight of a bridge is folded into the next linear map (all ones, zero bias)."""
    norms = [model.ln_final] + [getattr(b, name) for b in model.blocks for name in ("ln1", "ln2") if hasattr(b, name)]
    return all(_is_unit(n) for n in norms)


def _is_unit(module) -> bool:
    w, b = getattr(module, "w", None), getattr(module, "b", None)
    return (w is None or bool((w == 1).all())) and (b is None or not bool(b.any()))


def dtype(model) -> torch.dtype:
    """The dtype the model computes in (a bridge's ``cfg.dtype`` stays float32 whatever its weights)."""
    return model.W_E.dtype if is_bridge(model) else model.cfg.dtype


# --------------------------------------------------------------------------- weights


def norm_kind(module) -> str | None:
    """``"LN"``, ``"LNPre"``, ``"RMS"``, ``"RMSPre"``, or None for no norm (``nn.Identity``)."""
    if module is None or isinstance(module, torch.nn.Identity):
        return None
    if isinstance(module, _NormView):
        return module.kind
    from transformer_lens.components import LayerNorm, LayerNormPre, RMSNorm, RMSNormPre

    for kind, cls in (("LN", LayerNorm), ("LNPre", LayerNormPre), ("RMS", RMSNorm), ("RMSPre", RMSNormPre)):
        if type(module) is cls:
            return kind
    raise GradGraphError(f"a norm of type {type(module).__name__} is not covered (LayerNorm, LayerNormPre, RMSNorm, "
                         f"RMSNormPre or none)")


class _NormView:
    """A bridge's norm as 3.9 holds it: ``kind``, ``eps`` and, unless folded, ``w`` (and ``b``)."""

    def __init__(self, module, rms: bool, eps: float):
        folded = _is_unit(module)
        self.kind = ("RMS" if rms else "LN") + ("Pre" if folded else "")
        self.eps = eps
        self.module = module
        if not folded:
            self.w = module.w
            if getattr(module, "b", None) is not None:
                self.b = module.b

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def _zeros_if_none(tensor, shape, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros(shape, dtype=like.dtype, device=like.device) if tensor is None else tensor


def _attention_view(model, attn) -> SimpleNamespace:
    cfg = model.cfg
    H, G, e = cfg.n_heads, cfg.n_key_value_heads or cfg.n_heads, cfg.d_head
    W_Q, W_K, W_V, W_O = attn.W_Q, attn.W_K, attn.W_V, attn.W_O  # [H, d, e], [G, d, e], [G, d, e], [H, e, d]
    view = SimpleNamespace(
        W_Q=W_Q, W_K=W_K, W_V=W_V, W_O=W_O,
        b_Q=_zeros_if_none(attn.b_Q, (H, e), W_Q), b_K=_zeros_if_none(attn.b_K, (G, e), W_Q),
        b_V=_zeros_if_none(attn.b_V, (G, e), W_Q), b_O=_zeros_if_none(attn.b_O, (cfg.d_model,), W_Q),
        attn_scale=math.sqrt(e) if cfg.attn_scale in (None, -1, -1.0) else float(cfg.attn_scale),
        q_norm=None, k_norm=None,  # the bridged architectures have no q/k norms
    )
    if cfg.positional_embedding_type == "rotary":
        view.rotary_cos, view.rotary_sin = _rotary_tables(model, W_Q)
    return view


def _rotary_tables(model, like: torch.Tensor, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin ``[n (n_ctx), rotary_dim]`` from the Hugging Face model's own rotary module."""
    rotary = next(m for name, m in model.original_model.named_modules() if name.endswith("rotary_emb"))
    positions = torch.arange(model.cfg.n_ctx if n is None else n, device=like.device)[None]
    with torch.no_grad():
        cos, sin = rotary(like.new_zeros(1), positions)
    return cos[0].to(like.dtype), sin[0].to(like.dtype)


def rotary_tables(model, layer: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin ``[n, rotary_dim]`` of ``layer``'s rotary embedding for positions 0..n − 1, by the
    model's own formula (past the tables it keeps, which stop at ``n_ctx``)."""
    if is_bridge(model):
        return _rotary_tables(model, model.W_E, n)
    attn = model.blocks[layer].attn
    sin, cos = attn.calculate_sin_cos_rotary(model.cfg.rotary_dim, n, base=attn._rotary_base(), dtype=model.cfg.dtype)
    return cos.to(attn.rotary_cos.device), sin.to(attn.rotary_sin.device)


def _mlp_view(model, mlp) -> SimpleNamespace:
    W_in, W_out = mlp.W_in, mlp.W_out  # [d, m], [m, d]
    hf_mlp = mlp.original_component  # Llama's activation is act_fn, GPT-2's act
    act_fn = getattr(hf_mlp, "act_fn", None) or getattr(hf_mlp, "act")
    view = SimpleNamespace(W_in=W_in, W_out=W_out, act_fn=act_fn,
                           b_in=_zeros_if_none(mlp.b_in, (W_in.shape[1],), W_in),
                           b_out=_zeros_if_none(mlp.b_out, (W_out.shape[1],), W_in))
    if model.cfg.gated_mlp:
        view.W_gate = mlp.W_gate
    return view


def block(model, layer: int):
    """Layer ``layer``'s modules and weights under 3.9's names (on 3.9, ``model.blocks[layer]``)."""
    if not is_bridge(model):
        return model.blocks[layer]
    own = model.blocks[layer]
    rms = model.cfg.normalization_type == "RMS"
    view = SimpleNamespace(attn=_attention_view(model, own.attn), ln1=_NormView(own.ln1, rms, model.cfg.eps))
    if not model.cfg.attn_only:
        view.mlp = _mlp_view(model, own.mlp)
        view.ln2 = _NormView(own.ln2, rms, model.cfg.eps)
    return view


def final_norm(model):
    """The norm before the unembedding (on 3.9 ``model.ln_final``)."""
    if not is_bridge(model):
        return model.ln_final
    return _NormView(model.ln_final, model.cfg.normalization_type == "RMS", model.cfg.eps)


# --------------------------------------------------------------------------- hook firings


def hook_name(model, name: str) -> str:
    """The 3.9 name of the hook point that fires as ``name``: a bridge fires ``blocks.L.hook_in`` /
    ``hook_out`` for ``hook_resid_pre`` / ``hook_resid_post``."""
    return names.renamed(model.cfg.n_layers).get(name, name) if is_bridge(model) else name


def complete_firings(model, store: dict[str, list[torch.Tensor]]) -> None:
    """Give recorded firings 3.9's counts, in place: a bridge fires ``ln1``'s hooks once, on the
    residual, where 3.9 fires them per q/k/v input; each becomes the three firings, copied along the
    head axis as 3.9's split inputs give them (no gradient reaches these copies). GPT-NeoX's bridge
    fires no ``hook_rot_q``/``hook_rot_k``: they are formed from ``hook_q``/``hook_k`` and the
    rotary tables the layer recorded."""
    if not is_bridge(model):
        return
    H, G = model.cfg.n_heads, model.cfg.n_key_value_heads or model.cfg.n_heads
    for layer in range(model.cfg.n_layers):
        for kind in ("ln1_scale", "ln1_normalized"):
            tensors = store.get(names.name(kind, layer))
            if tensors is not None and len(tensors) == 1:
                (tensor,) = tensors
                store[names.name(kind, layer)] = [tensor[:, :, None].expand(*tensor.shape[:2], n, tensor.shape[-1])
                                                  for n in (H, G, G)]
        cos, sin = store.get(names.name("attn_cos", layer)), store.get(names.name("attn_sin", layer))
        for which in "qk":
            x, rot = names.name(which, layer), names.name(f"rot_{which}", layer)
            if rot not in store and x in store and cos and sin:
                store[rot] = [rotate(store[x][0], cos[0][0], sin[0][0], adjacent=False)]


# --------------------------------------------------------------------------- running


def stops_after_last_layer(model) -> bool:
    """Whether ``model(x, stop_at_layer=n_layers)`` returns the final residual stream (3.9); a
    bridge's goes on to the logits (``hooks.final_residual`` reads the residual on the way)."""
    return not is_bridge(model)


def copy_model(model):
    """An independent copy of ``model`` (3.9: ``copy.deepcopy``; a bridge holds tensors that cannot
    be deep-copied, and is refused)."""
    if is_bridge(model):
        raise GradGraphError("a TransformerBridge cannot be copied (it holds non-leaf tensors); the synthetic "
                             "study trains and copies TransformerLens 3.9 models")
    return copy.deepcopy(model)


def caches_prefix(model) -> bool:
    """Whether ``model`` can start a forward pass from a cached prefix's keys and values (``prefix_cache``);
    a bridge cannot, and graphs after a prefix are then sliced from the whole sequence's recording."""
    return not is_bridge(model)


@torch.no_grad()
def prefix_cache(model, prefix: torch.Tensor, batch: int):
    """TransformerLens' key/value cache of ``prefix`` ``[p]``, one run shared by ``batch`` rows, frozen
    (for ``model(tokens, past_kv_cache=cache, attention_mask=mask)``)."""
    if not caches_prefix(model):
        raise GradGraphError("this model cannot start from a cached prefix (lens.caches_prefix)")
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, 1)
    model(prefix[None], past_kv_cache=cache, attention_mask=torch.ones_like(prefix[None]),
          stop_at_layer=model.cfg.n_layers)
    for entry in cache.entries:
        entry.past_keys = entry.past_keys.expand(batch, -1, -1, -1)
        entry.past_values = entry.past_values.expand(batch, -1, -1, -1)
    cache.previous_attention_mask = cache.previous_attention_mask.expand(batch, -1)
    cache.freeze()
    return cache


# --------------------------------------------------------------------------- loading


def wrap_causal_lm(hf_model, tokenizer, config_folder: str | None = None):
    """A Hugging Face causal LM as the installed TransformerLens' model, with HookedTransformer's
    weight processing (fold_ln, centred writing weights and unembedding): 3.9 converts it to a
    ``HookedTransformer``; 4.x bridges it (``TransformerBridge``, compatibility mode) and needs a
    tokenizer. ``config_folder`` holds its config.json (written to a temporary one if None)."""
    if not hf_model.config.architectures:  # GGUF configs leave it empty
        hf_model.config.architectures = [type(hf_model).__name__]
    with tempfile.TemporaryDirectory() as scratch:
        if config_folder is None:
            hf_model.config.save_pretrained(scratch)  # writes config.json only
            config_folder = scratch
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _convert(config_folder, hf_model, tokenizer) if MAJOR < 4 else _bridge(config_folder, hf_model,
                                                                                         tokenizer)


def _convert(config_folder: str, hf_model, tokenizer):
    from transformer_lens import loading_from_pretrained as loading

    cfg = loading.get_pretrained_model_config(config_folder, hf_cfg=hf_model.config.to_dict(), fold_ln=True,
                                              device="cpu")
    state_dict = loading.get_pretrained_state_dict(config_folder, cfg, hf_model)
    cfg.tokenizer_name = None  # the tokenizer is passed in, never looked up by name
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    model.load_and_process_state_dict(state_dict, fold_ln=True, center_writing_weights=True, center_unembed=True)
    return model


def _bridge(config_folder: str, hf_model, tokenizer):
    architecture = hf_model.config.architectures[0]
    if architecture not in BRIDGE_ARCHITECTURES:
        raise GradGraphError(f"gradgraph reads TransformerBridges of {', '.join(sorted(BRIDGE_ARCHITECTURES))}; "
                             f"this model is a {architecture} (TransformerLens 3.9 covers more families)")
    if tokenizer is None:
        raise GradGraphError("a TransformerBridge needs the model's tokenizer; pass one")
    model = TransformerBridge.boot_transformers(config_folder, hf_model=hf_model.eval(), tokenizer=tokenizer)
    model.enable_compatibility_mode(disable_warnings=True)
    return model


def set_flags(model):
    """Switch on the hook points the gradient graph reads (split q/k/v inputs, ``hook_mlp_in``) and
    off the costly one (``use_attn_result``); a bridge also gets compatibility mode."""
    if is_hooked_encoder(model):  # its blocks read the flags from the config
        model.cfg.use_split_qkv_input = True
        model.cfg.use_hook_mlp_in = True
        model.cfg.use_attn_result = False
        return model.eval()
    if is_bridge(model) and not getattr(model, "compatibility_mode", False):
        model.enable_compatibility_mode(disable_warnings=True)
    model.set_use_split_qkv_input(True)
    if not model.cfg.attn_only:  # an attention-only model has no MLP input to hook
        model.set_use_hook_mlp_in(True)
    model.set_use_attn_result(False)
    return model.eval()


def official_name(name: str) -> str:
    """TransformerLens' official (hub) name for ``name`` (``gpt2`` → ``openai-community/gpt2``);
    ``LookupError`` if TransformerLens does not know it."""
    if MAJOR < 4:
        from transformer_lens.loading_from_pretrained import get_official_model_name
    else:
        from transformer_lens.supported_models import get_official_model_name
    try:
        return get_official_model_name(name)
    except ValueError:
        raise LookupError(name) from None


def official_class(official: str) -> type:
    """What loads an official name: on 3.9 ``HookedEncoder`` for BERT's masked language models and
    ``HookedTransformer`` for the rest; on 4.x ``TransformerBridge``."""
    if MAJOR >= 4:
        return TransformerBridge
    return HookedEncoder if official.startswith("google-bert/") else HookedTransformer


def load_official(name: str):
    """A model from the Hugging Face hub by its official name (downloads)."""
    if MAJOR >= 4:
        model = TransformerBridge.boot_transformers(name, device="cpu")
        model.enable_compatibility_mode(disable_warnings=True)
        return model
    return official_class(name).from_pretrained(name, device="cpu")


def new_model(config: dict, architecture: str, randomise, *, encoder: bool = False):
    """A random model of HookedTransformerConfig fields ``config``, its parameters set by
    ``randomise([(name, parameter, kind), ...])`` (kind ``"norm"``, ``"bias"`` or ``"matrix"``).
    3.9 builds it directly; 4.x builds the Hugging Face model of ``architecture`` with those sizes,
    randomises it, and bridges it (weights processed as from_pretrained would, word-per-id tokenizer)."""
    if MAJOR < 4:
        cfg = HookedTransformerConfig(original_architecture=architecture, **config)
        model = (HookedEncoder if encoder else HookedTransformer)(cfg, move_to_device=False)
        with torch.no_grad():
            randomise(_kinds(model, hf=False))
        return model
    hf_model = _hf_model(config, architecture)
    with torch.no_grad():
        randomise(_kinds(hf_model, hf=True))
    model = word_bridge(hf_model)
    model.enable_compatibility_mode(disable_warnings=True)
    return model


def word_bridge(hf_model):
    """``hf_model`` bridged as ``TransformerBridge.boot_transformers`` gives it (no compatibility mode),
    with a word-per-id tokenizer (a bridge insists on one, and reloads it from its path)."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as folder:
        hf_model.config.save_pretrained(folder)
        _word_tokenizer(hf_model.config.vocab_size).save_pretrained(folder)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return TransformerBridge.boot_transformers(folder, hf_model=hf_model.eval(),
                                                       tokenizer=AutoTokenizer.from_pretrained(folder))


# HookedTransformerConfig fields a Hugging Face config of each bridged architecture carries; any
# other field must keep the family's value
_HF_FIELDS = {
    "GPT2LMHeadModel": dict(normalization_type="LN", positional_embedding_type="standard", act_fn="gelu_new"),
    "LlamaForCausalLM": dict(normalization_type="RMS", positional_embedding_type="rotary", act_fn="silu",
                             gated_mlp=True, final_rms=True, rotary_adjacent_pairs=False),
    "GPTNeoXForCausalLM": dict(normalization_type="LN", positional_embedding_type="rotary", act_fn="gelu",
                               parallel_attn_mlp=True, rotary_adjacent_pairs=False),
}
_SIZES = ("n_layers", "d_model", "n_heads", "d_head", "d_mlp", "n_ctx", "d_vocab", "dtype", "seed", "device",
          "init_weights", "n_key_value_heads", "rotary_dim")


def _hf_model(config: dict, architecture: str):
    import transformers

    if architecture not in _HF_FIELDS:
        raise GradGraphError(f"tiny models on TransformerLens {VERSION} are bridged Hugging Face models of "
                             f"{', '.join(sorted(_HF_FIELDS))}; {architecture} is not one (TransformerLens 3.9 "
                             f"builds every family)")
    other = {k: v for k, v in config.items() if k not in _SIZES and _HF_FIELDS[architecture].get(k, object()) != v}
    partial = architecture == "GPTNeoXForCausalLM"  # the one with a rotary_pct
    if other or (not partial and config.get("rotary_dim", config["d_head"]) != config["d_head"]):
        raise GradGraphError(f"a bridged {architecture} has no setting for {sorted(other) or ['rotary_dim']}")
    c = config
    sizes = dict(vocab_size=c["d_vocab"], tie_word_embeddings=False)
    if c["d_model"] % c["n_heads"] or (architecture == "GPT2LMHeadModel" and c["n_heads"] * c["d_head"] != c["d_model"]):
        raise GradGraphError(f"a Hugging Face {architecture} needs d_model divisible by n_heads"
                             + (" and n_heads * d_head == d_model" if architecture == "GPT2LMHeadModel" else ""))
    if architecture == "GPT2LMHeadModel":
        hf_config = transformers.GPT2Config(n_positions=c["n_ctx"], n_embd=c["d_model"], n_layer=c["n_layers"],
                                            n_head=c["n_heads"], n_inner=c["d_mlp"], activation_function="gelu_new",
                                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **sizes)
    elif partial:
        hf_config = transformers.GPTNeoXConfig(
            hidden_size=c["d_model"], intermediate_size=c["d_mlp"], num_hidden_layers=c["n_layers"],
            num_attention_heads=c["n_heads"], max_position_embeddings=c["n_ctx"], hidden_act="gelu",
            rotary_pct=c.get("rotary_dim", c["d_head"]) / c["d_head"], use_parallel_residual=True,
            attention_dropout=0.0, hidden_dropout=0.0, **sizes)
    else:
        hf_config = transformers.LlamaConfig(
            hidden_size=c["d_model"], intermediate_size=c["d_mlp"], num_hidden_layers=c["n_layers"],
            num_attention_heads=c["n_heads"], num_key_value_heads=c.get("n_key_value_heads") or c["n_heads"],
            head_dim=c["d_head"], max_position_embeddings=c["n_ctx"], rms_norm_eps=1e-5, **sizes)
    hf_config.architectures = [architecture]
    torch.manual_seed(c.get("seed") or 0)
    return getattr(transformers, architecture)(hf_config).to(c.get("dtype", torch.float32)).eval()


def _word_tokenizer(d_vocab: int):
    """A tokenizer whose words are the ids: ``"t0 t1 …"`` (a bridge insists on a tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(d_vocab)}, unk_token="t0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=words, bos_token="t0", eos_token="t0", pad_token="t0",
                                   unk_token="t0")


def _kinds(module, hf: bool) -> list[tuple[str, torch.Tensor, str]]:
    """``(name, parameter, kind)``, kind ``"norm"`` (a norm's weight), ``"bias"`` or ``"matrix"``."""
    out = []
    for name, param in module.named_parameters():
        leaf = name.split(".")[-1]
        is_norm = (("norm" in name or ".ln_" in name) and leaf == "weight") if hf else leaf == "w"
        is_bias = leaf == "bias" if hf else (leaf.startswith("b_") or leaf == "b")
        out.append((name, param, "norm" if is_norm else "bias" if is_bias else "matrix"))
    return out
