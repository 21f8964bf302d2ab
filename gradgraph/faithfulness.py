"""Faithfulness: remove the tokens an attribution ranks highest and watch the prediction fall
(AOPC and log-odds by replacement, Mask-LRP's protocol; log-odds, comprehensiveness and
sufficiency at the top 20 %, DIG's and UDIG's; REFERENCES.md §2 and §5). One implementation for
every evaluation of the project (``measure``).

The prediction is a two-way probability ``p = σ(logit(good) − logit(bad))`` at the last position
(the label word against its alternative: " positive" vs " negative", " are" vs " is"). At each
level ``f`` (10 %, 20 %, …, 90 %), the ``ceil(f · n)`` highest-scored of the ``n`` candidate tokens
are replaced by ``replace_id`` (the pad token; Mask-LRP's code uses BERT's [PAD]):

- AOPC = mean over items and levels of ``p(x) − p(x with top-f replaced)`` (higher is better);
- log-odds = mean of ``log(p(x with top-f replaced) / p(x))`` (lower is better).

DIG's conventions (``TOP`` = 20 %, k = int(0.2 · n), probabilities of the *predicted* label ŷ):
log-odds = log p′(ŷ) − log p(ŷ) with the top k replaced by ``replace_id`` (the baseline word);
comprehensiveness = p(ŷ) − p′(ŷ) with the top k deleted (higher is better); sufficiency =
p(ŷ) − p′(ŷ) with only the top k of the candidates kept (lower is better). The prompt around the
candidates (few-shot examples, the question) always stays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gradgraph import hooks
from gradgraph.errors import GradGraphError

LEVELS = tuple(round(0.1 * i, 1) for i in range(1, 10))
TOP = 0.2


@dataclass(frozen=True)
class Example:
    """A prompt to explain: token ids, the positions an attribution may remove, the label word and
    its alternative (p = σ(logit(good) − logit(bad)) at the last position)."""

    tokens: tuple[int, ...]
    candidates: tuple[int, ...]  # positions that may be removed (never BOS or the prompt around them)
    good: int
    bad: int


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
    final = getattr(model, "ln_final", None)  # absent in a model without norms
    last = resid[:, -1:] if final is None else final(resid[:, -1:])
    logits = last @ model.W_U[:, ids] + model.b_U[ids]  # [n, 1, 2]
    return torch.sigmoid(logits[:, 0, 0] - logits[:, 0, 1]).double().cpu()


def top_positions(scores: torch.Tensor, candidates: torch.Tensor, fraction: float = TOP) -> torch.Tensor:
    """The ``int(fraction · n)`` highest-scored of the ``n`` candidates (DIG's k; ties: earlier first)."""
    k = int(int(candidates.sum()) * fraction + 1e-9)
    ranked = torch.where(candidates, scores.double(), torch.tensor(-math.inf, dtype=torch.float64))
    return torch.sort(ranked, descending=True, stable=True).indices[:k]


def _variants(example: Example, scores: torch.Tensor, replace_id: int, levels, top: float | None
              ) -> dict[str, list[tuple]]:
    tokens = torch.tensor(example.tokens)
    candidates = torch.zeros(len(tokens), dtype=torch.bool)
    candidates[list(example.candidates)] = True
    scores = scores[: len(tokens)]
    rows = [tuple(replaced(tokens, scores, candidates, f, replace_id).tolist()) for f in levels]
    if top is None:
        return dict(levels=rows)
    chosen = top_positions(scores, candidates, top)
    removed = torch.zeros(len(tokens), dtype=torch.bool)
    removed[chosen] = True
    swapped = tokens.clone()
    swapped[chosen] = replace_id
    kept = ~candidates | removed if len(chosen) else torch.ones_like(candidates)  # k = 0: DIG scores 0
    return dict(levels=rows, log_odds=[tuple(swapped.tolist())], comprehensiveness=[tuple(tokens[~removed].tolist())],
                sufficiency=[tuple(tokens[kept].tolist())])


def measure(model, example: Example, scores: dict[str, torch.Tensor], replace_id: int, *, levels=LEVELS,
            top: float | None = TOP) -> dict[str, dict]:
    """Every faithfulness measurement of each method's token ``scores`` ``{method: [pos]}`` on one
    example: ``{method: dict(p, levels [len(levels)], log_odds, comprehensiveness, sufficiency)}``
    (``p`` and ``levels``: σ(good − bad) before and after replacing each level's top tokens; the
    other three as in the module docstring). Identical rows run once; rows of one length share the
    prompt before the first candidate through a key/value cache. ``top=None``: the levels only."""
    original = tuple(example.tokens)
    variants = {method: _variants(example, s, replace_id, levels, top) for method, s in scores.items()}
    unique = {original}
    for rows in variants.values():
        for kind in rows.values():
            unique.update(kind)
    prefix = min(example.candidates)
    p: dict[tuple, float] = {}
    for length in sorted({len(r) for r in unique}):
        group = [r for r in unique if len(r) == length]
        shared = prefix if prefix > 1 and length > prefix else 0
        values = two_way_probability(model, torch.tensor(group), example.good, example.bad, prefix=shared)
        p.update(zip(group, values.tolist()))
    p0 = p[original]
    good = p0 >= 0.5  # the predicted label

    def predicted(row: tuple) -> float:
        return p[row] if good else 1.0 - p[row]

    out = {}
    for method, rows in variants.items():
        pred0 = predicted(original)
        out[method] = dict(p=p0, levels=torch.tensor([p[r] for r in rows["levels"]], dtype=torch.float64))
        if top is None:
            continue
        out[method].update(
            log_odds=math.log(max(predicted(rows["log_odds"][0]), 1e-12)) - math.log(max(pred0, 1e-12)),
            comprehensiveness=pred0 - predicted(rows["comprehensiveness"][0]),
            sufficiency=pred0 - predicted(rows["sufficiency"][0]))
    return out


def deletion_scores(p: torch.Tensor, p_deleted: torch.Tensor) -> dict[str, float | list[float]]:
    """AOPC and log-odds from the original probabilities ``[n]`` and those after deletion
    ``[n, levels]``: the means over items and levels, and per level."""
    if p.ndim != 1 or p_deleted.shape[0] != p.shape[0]:
        raise GradGraphError(f"expected p [n] and p_deleted [n, levels], got {tuple(p.shape)}, {tuple(p_deleted.shape)}")
    drop = p[:, None] - p_deleted
    log_odds = torch.log(p_deleted.clamp(min=1e-12)) - torch.log(p.clamp(min=1e-12))[:, None]
    return dict(aopc=float(drop.mean()), log_odds=float(log_odds.mean()),
                aopc_by_level=drop.mean(0).tolist(), log_odds_by_level=log_odds.mean(0).tolist())


__all__ = ["Example", "LEVELS", "TOP", "deletion_scores", "measure", "replaced", "top_positions", "two_way_probability"]
