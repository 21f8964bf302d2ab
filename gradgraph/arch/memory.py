"""How much memory a gradient graph will take, checked before any of it is spent.

A graph keeps what the forward pass recorded (about what autograd saves for its backward) and a
backward pass keeps one value per node element. Per layer and position that is a few residual-width
vectors, the q/k/v/MLP activations and two attention rows of ``n_heads × positions`` (scores and
pattern), which is why memory grows as ``batch × positions²`` for long prompts. Past
``PATTERN_BUDGET`` the graph keeps the queries and keys instead and forms each layer's scores and
pattern when a pass reads them (``recomputes_patterns``); a pass then goes through each layer's
attention a chunk of query rows at a time (``gradgraph.chunked``, ``CHUNK_ELEMENTS`` scores per
chunk), so that memory grows linearly with positions per head: what stays quadratic is the mask of
allowed (query, key) pairs, a byte per pair, shared by every layer and head.
"""

from __future__ import annotations

import os

import torch

from gradgraph.errors import GradGraphError

# one pass's temporaries and the allocator's slack, on top of what the graph and its values hold
# (measured on SmolLM2 at 512 tokens: a Real backprop keeping every node peaked at 0.95x the raw estimate)
HEADROOM = 1.2
# bytes of kept scores and patterns (every layer) above which a graph recomputes them per pass: a
# pass then goes through attention in chunks, its causal chunks reading only the keys before them
# (SmolLM2-135M from 128 tokens; at 512 its Max pass, recording included, took 3.2 s for 4.0 s kept)
PATTERN_BUDGET = 2**25
PATTERN_CHOICES = ("auto", "keep", "recompute")
# elements of one chunk's scores (B · H · rows · keys, 4 MiB in float32) when a recomputing graph's
# pass goes through a layer's attention a chunk of query rows at a time (gradgraph.chunked), and the
# fewest rows a chunk has (a chunk's Python work and its kernels' start cost as much as 16 rows):
# at 2,048 tokens 56-row chunks took 15.1 s for Real, 455-row ones 17.5 s, 14-row ones 16.1 s
CHUNK_ELEMENTS = 2**20
CHUNK_ROWS = 16


def pattern_bytes(cfg, batch: int, positions: int, dtype: torch.dtype) -> int:
    """What keeping every layer's scores and pattern takes: ``2 · n_layers · B · H · P²`` elements."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.n_layers * batch * cfg.n_heads * positions**2 * itemsize


def recomputes_patterns(patterns: str, cfg, batch: int, positions: int, dtype: torch.dtype) -> bool:
    """Whether a graph forms its scores and patterns per pass (``"recompute"``; ``"auto"``: when
    keeping them would take more than ``PATTERN_BUDGET``) rather than keeping them (``"keep"``)."""
    if patterns not in PATTERN_CHOICES:
        raise GradGraphError(f"patterns must be one of {PATTERN_CHOICES}, got {patterns!r}")
    if patterns == "auto":
        return pattern_bytes(cfg, batch, positions, dtype) > PATTERN_BUDGET
    return patterns == "recompute"


def chunk_rows(batch: int, heads: int, queries: int, keys: int) -> int:
    """Query rows per chunk: ``CHUNK_ELEMENTS`` scores of ``batch × heads × keys`` each (at least
    ``CHUNK_ROWS``), the ``queries`` split as evenly as the chunks go."""
    rows = max(CHUNK_ROWS, CHUNK_ELEMENTS // (batch * heads * keys))
    chunks = -(-queries // rows)
    return -(-queries // chunks)


def graph_bytes(cfg, batch: int, positions: int, dtype: torch.dtype, recompute: bool = False,
                logit_rows: int | None = None) -> int:
    """Bytes to record ``batch × positions`` tokens and run one backward pass keeping every node;
    with ``recompute`` (patterns formed per pass, a long prompt's), one keeping what it is asked for
    (the inputs, say), which holds the values of one layer and a chunk of its attention at a time.
    ``logit_rows``: the positions the logits are made at (a metric of one position per row: the
    batch; default every position)."""
    d, e, m, V = cfg.d_model, cfg.d_head, cfg.d_mlp, cfg.d_vocab
    H = cfg.n_heads
    G = cfg.n_key_value_heads or H
    layer_norm = 1 if cfg.normalization_type in ("LN", "LNPre") else 0
    rotary = cfg.positional_embedding_type == "rotary"
    gated = bool(cfg.gated_mlp)
    qkv = (H + 2 * G) * e + (H + G) * e * rotary
    attention = 2 * H * positions  # scores and pattern
    recorded = 7 * d + 2 * d * layer_norm + qkv + H * e + (2 + gated) * m
    values = recorded + (H + 2 * G) * d * (2 + layer_norm)  # per-head copies of the residual and ln1
    itemsize = torch.empty((), dtype=dtype).element_size()
    logits = 3 * V * (batch * positions if logit_rows is None else logit_rows)  # logits, their gradient, a softmax
    if recompute:  # what is recorded; one layer's values at a time, and one chunk of its attention (the raw
        # scores, scores and pattern, their values and a product's temporaries); the allowed (query, key) pairs
        per_position = cfg.n_layers * recorded + values
        chunk = 8 * itemsize * batch * H * positions * chunk_rows(batch, H, positions, positions)
        masks = 2 * positions  # the causal pairs and the allowed ones per prompt (bools)
        return int(HEADROOM * (batch * positions * (itemsize * per_position + masks) + itemsize * logits + chunk))
    per_position = cfg.n_layers * (recorded + attention + values + attention)
    return int(HEADROOM * itemsize * (batch * positions * per_position + logits))


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


def check_fits(cfg, batch: int, positions: int, dtype: torch.dtype, device, recompute: bool = False,
               logit_rows: int | None = None) -> None:
    """Raise ``GradGraphError`` with the estimate and what to do when the graph would not fit."""
    need = graph_bytes(cfg, batch, positions, dtype, recompute, logit_rows)
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
