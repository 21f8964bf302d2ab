"""Faithfulness by deletion: replace the tokens an attribution ranks highest and watch the
prediction fall (AOPC, log-odds; Mask-LRP's and DIG's protocol, REFERENCES.md §2 and §5).

The prediction is a two-way probability ``p = σ(logit(good) − logit(bad))`` at the last position
(the label word against its alternative: " positive" vs " negative", " are" vs " is"). At each
level ``f`` (10 %, 20 %, …, 90 %), the ``ceil(f · n)`` highest-scored of the ``n`` candidate tokens
are replaced by ``replace_id`` (the pad token; Mask-LRP's code uses BERT's [PAD]):

- AOPC = mean over items and levels of ``p(x) − p(x with top-f replaced)`` (higher is better);
- log-odds = mean of ``log(p(x with top-f replaced) / p(x))`` (lower is better).
"""

from __future__ import annotations

import math

import torch

from gradgraph import hooks
from gradgraph.errors import GradGraphError

LEVELS = tuple(round(0.1 * i, 1) for i in range(1, 10))


def replaced(tokens: torch.Tensor, scores: torch.Tensor, candidates: torch.Tensor, fraction: float,
             replace_id: int) -> torch.Tensor:
    """``tokens`` ``[pos]`` with the ``ceil(fraction · n)`` highest-scored candidates replaced
    (ties broken by position, earlier first)."""
    if not 0 <= fraction <= 1:
        raise GradGraphError(f"a deletion level is a fraction in [0, 1], got {fraction}")
    n = int(candidates.sum())
    k = math.ceil(fraction * n - 1e-9)
    ranked = torch.where(candidates, scores.double(), torch.tensor(-math.inf, dtype=torch.float64))
    order = torch.sort(ranked, descending=True, stable=True).indices[:k]
    out = tokens.clone()
    out[order] = replace_id
    return out


@torch.no_grad()
def two_way_probability(model, rows: torch.Tensor, good: int, bad: int, *, prefix: int = 0,
                        batch_size: int = 64) -> torch.Tensor:
    """``σ(logit(good) − logit(bad))`` at the last position of each row ``[n, pos]`` (no padding).
    Rows that share their first ``prefix`` tokens reuse one run of that prefix (a frozen key/value
    cache), so only the differing suffixes run per row."""
    if rows.ndim != 2 or rows.shape[0] == 0:
        raise GradGraphError(f"rows must be a non-empty [n, pos] tensor of token ids, got {tuple(rows.shape)}")
    if prefix and not bool((rows[:, :prefix] == rows[:1, :prefix]).all()):
        raise GradGraphError("two_way_probability: the rows differ inside the shared prefix")
    with hooks.plain_forward(model):
        return torch.cat([_two_way(model, rows[start:start + batch_size], good, bad, prefix)
                          for start in range(0, rows.shape[0], batch_size)])


def _two_way(model, chunk: torch.Tensor, good: int, bad: int, prefix: int) -> torch.Tensor:
    """``two_way_probability`` of one batch of rows ``[n, pos]``."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    if prefix:
        cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, 1)
        # explicit all-ones masks: TransformerLens would otherwise take replaced (pad) tokens for padding
        model(chunk[:1, :prefix], past_kv_cache=cache, attention_mask=torch.ones_like(chunk[:1, :prefix]))
        for entry in cache.entries:  # the prefix once, shared by every row of the chunk
            entry.past_keys = entry.past_keys.expand(len(chunk), -1, -1, -1)
            entry.past_values = entry.past_values.expand(len(chunk), -1, -1, -1)
        cache.previous_attention_mask = cache.previous_attention_mask.expand(len(chunk), -1)
        cache.freeze()
        suffix = chunk[:, prefix:]
        resid = model(suffix, past_kv_cache=cache, attention_mask=torch.ones_like(suffix),
                      stop_at_layer=model.cfg.n_layers)
    else:
        resid = model(chunk, stop_at_layer=model.cfg.n_layers)
    ids = torch.tensor([good, bad], device=chunk.device)
    logits = model.ln_final(resid[:, -1:]) @ model.W_U[:, ids] + model.b_U[ids]  # [n, 1, 2]
    return torch.sigmoid(logits[:, 0, 0] - logits[:, 0, 1]).double().cpu()


def deletion_scores(p: torch.Tensor, p_deleted: torch.Tensor) -> dict[str, float | list[float]]:
    """AOPC and log-odds from the original probabilities ``[n]`` and those after deletion
    ``[n, levels]``: the means over items and levels, and per level."""
    if p.ndim != 1 or p_deleted.shape[0] != p.shape[0]:
        raise GradGraphError(f"expected p [n] and p_deleted [n, levels], got {tuple(p.shape)}, {tuple(p_deleted.shape)}")
    drop = p[:, None] - p_deleted
    log_odds = torch.log(p_deleted.clamp(min=1e-12)) - torch.log(p.clamp(min=1e-12))[:, None]
    return dict(aopc=float(drop.mean()), log_odds=float(log_odds.mean()),
                aopc_by_level=drop.mean(0).tolist(), log_odds_by_level=log_odds.mean(0).tolist())


__all__ = ["LEVELS", "deletion_scores", "replaced", "two_way_probability"]
