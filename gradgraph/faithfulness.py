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

from gradgraph.arch import inference
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
def two_way_probability(model, rows: torch.Tensor, good: int, bad: int, *, prefix: int = 0) -> torch.Tensor:
    """``σ(logit(good) − logit(bad))`` at the last position of each row ``[n, pos]`` (no padding).
    Rows that share their first ``prefix`` tokens run that prefix once (``gradgraph.arch.inference``)."""
    if rows.ndim != 2 or rows.shape[0] == 0:
        raise GradGraphError(f"rows must be a non-empty [n, pos] tensor of token ids, got {tuple(rows.shape)}")
    if prefix and not bool((rows[:, :prefix] == rows[:1, :prefix]).all()):
        raise GradGraphError("two_way_probability: the rows differ inside the shared prefix")
    logits = inference.last_logits(model, rows, torch.tensor([good, bad], device=rows.device),
                                   prefix=min(prefix, rows.shape[1] - 1))
    return torch.sigmoid(logits[:, 0] - logits[:, 1]).double().cpu()


def probabilities(model, requests: set[tuple[tuple[int, ...], int, int]]) -> dict[tuple, float]:
    """``{(row, good, bad): σ(logit(good) − logit(bad))}`` at each row's last position, for rows of
    any lengths and label pairs: rows of one length run together, their common prefix once."""
    by_length: dict[int, set[tuple[int, ...]]] = {}
    for row, _, _ in requests:
        by_length.setdefault(len(row), set()).add(row)
    ids = sorted({i for _, good, bad in requests for i in (good, bad)})
    column = {token: n for n, token in enumerate(ids)}
    logits: dict[tuple[int, ...], torch.Tensor] = {}
    for length, rows in sorted(by_length.items()):
        ordered = sorted(rows)
        tensor = torch.tensor(ordered)
        same = (tensor == tensor[:1]).all(0)  # [pos]: the columns every row agrees on
        prefix = min(int(same.long().cumprod(0).sum()), length - 1)
        values = inference.last_logits(model, tensor, torch.tensor(ids), prefix=prefix).double().cpu()
        logits.update(zip(ordered, values))
    return {(row, good, bad): float(torch.sigmoid(logits[row][column[good]] - logits[row][column[bad]]))
            for row, good, bad in requests}


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
    other three as in the module docstring). ``top=None``: the levels only."""
    return measure_all(model, [example], [scores], replace_id, levels=levels, top=top)[0]


def measure_all(model, examples: list[Example], scores: list[dict[str, torch.Tensor]], replace_id: int, *,
                levels=LEVELS, top: float | None = TOP) -> list[dict[str, dict]]:
    """``measure`` of many examples at once: every distinct row of all of them runs once, rows of
    one length together (``probabilities``)."""
    variants = [{method: _variants(example, s, replace_id, levels, top) for method, s in by_method.items()}
                for example, by_method in zip(examples, scores)]
    requests = set()
    for example, rows_of in zip(examples, variants):
        key = (example.good, example.bad)
        requests.add((tuple(example.tokens), *key))
        for rows in rows_of.values():
            for kind in rows.values():
                requests.update((row, *key) for row in kind)
    p = probabilities(model, requests)
    return [_measured(example, rows_of, p, top) for example, rows_of in zip(examples, variants)]


def _measured(example: Example, variants: dict, probability: dict, top: float | None) -> dict[str, dict]:
    original = tuple(example.tokens)
    p0 = probability[(original, example.good, example.bad)]
    good = p0 >= 0.5  # the predicted label

    def predicted(row: tuple) -> float:
        value = probability[(row, example.good, example.bad)]
        return value if good else 1.0 - value

    out = {}
    pred0 = predicted(original)
    for method, rows in variants.items():
        level_p = [probability[(r, example.good, example.bad)] for r in rows["levels"]]
        out[method] = dict(p=p0, levels=torch.tensor(level_p, dtype=torch.float64))
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


__all__ = ["Example", "LEVELS", "TOP", "deletion_scores", "measure", "measure_all", "probabilities", "replaced",
           "top_positions", "two_way_probability"]
