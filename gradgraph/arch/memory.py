"""How much memory a gradient graph will take, checked before any of it is spent.

A graph keeps what the forward pass recorded (about what autograd saves for its backward) and a
backward pass keeps one value per node element. Per layer and position that is a few residual-width
vectors, the q/k/v/MLP activations and two attention rows of ``n_heads × positions`` (scores and
pattern), which is why memory grows as ``batch × positions²`` for long prompts.
"""

from __future__ import annotations

import os

import torch

from gradgraph.errors import GradGraphError

# one pass's temporaries and the allocator's slack, on top of what the graph and its values hold
# (measured on SmolLM2 at 512 tokens: a Real backprop keeping every node peaked at 0.95x the raw estimate)
HEADROOM = 1.2


def graph_bytes(cfg, batch: int, positions: int, dtype: torch.dtype) -> int:
    """Bytes to record ``batch × positions`` tokens and run one backward pass keeping every node."""
    d, e, m, V = cfg.d_model, cfg.d_head, cfg.d_mlp, cfg.d_vocab
    H = cfg.n_heads
    G = cfg.n_key_value_heads or H
    layer_norm = 1 if cfg.normalization_type in ("LN", "LNPre") else 0
    rotary = cfg.positional_embedding_type == "rotary"
    gated = bool(cfg.gated_mlp)
    qkv = (H + 2 * G) * e + (H + G) * e * rotary
    recorded = 7 * d + 2 * d * layer_norm + qkv + 2 * H * positions + H * e + (2 + gated) * m
    values = recorded + (H + 2 * G) * d * (2 + layer_norm)  # per-head copies of the residual and ln1
    per_position = cfg.n_layers * (recorded + values) + 3 * V  # logits, their gradient, a softmax
    itemsize = torch.empty((), dtype=dtype).element_size()
    return int(HEADROOM * itemsize * batch * positions * per_position)


def available_bytes(device: torch.device | str) -> int:
    """Free memory where the graph will live: the GPU's, or the machine's available RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(cfg, batch: int, positions: int, dtype: torch.dtype, device) -> None:
    """Raise ``GradGraphError`` with the estimate and what to do when the graph would not fit."""
    need = graph_bytes(cfg, batch, positions, dtype)
    have = available_bytes(device)
    if need > have:
        hints = ["fewer tokens (memory grows with positions², through attention)"]
        if batch > 1:
            hints.append(f"a smaller batch than {batch} (memory grows linearly with it)")
        if dtype == torch.float64:
            hints.append("float32 (half the memory)")
        raise GradGraphError(
            f"this graph ({batch} × {positions} tokens, {dtype}) needs about {need / 2**30:.1f} GiB with one "
            f"backward pass, and {have / 2**30:.1f} GiB are available on {torch.device(device)}; use "
            + ", or ".join(hints)
        )
