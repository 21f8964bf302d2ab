"""Quantities of interest: functions from logits ``[batch, pos, vocab]`` to ``[batch]``.

A metric is a callable ``metric(logits, attention_mask=None) -> Tensor[batch]``; a plain
``metric(logits) -> Tensor[batch]`` works too (it cannot see padding). Positions count from the
start of each prompt; a negative ``pos`` counts back from each prompt's last real token (found
from ``attention_mask``, so right-padded batches work). ``logit_diff`` and ``logprob_diff`` take
token ids or words (``logit_diff(" are", " is")``); words are resolved with the model's
tokenizer by ``prepare``, which every entry point that takes a metric calls.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch

from gradgraph.errors import GradGraphError
from gradgraph.prompts import single_token_id

Metric = Callable[..., torch.Tensor]
SIGNATURE = "(logits [batch, pos, vocab], attention_mask [batch, pos] = None) -> [batch]"


def prepare(metric, model) -> Metric:
    """``metric`` as a function of ``(logits, attention_mask)``: words resolved with the model's
    tokenizer, a one-argument function of the logits wrapped; anything else a ``GradGraphError``."""
    if not callable(metric):
        raise GradGraphError(
            f"metric must be a function {SIGNATURE}, e.g. gradgraph.metrics.logit_diff(' are', ' is'); "
            f"got {type(metric).__name__}"
        )
    resolve = getattr(metric, "resolve", None)
    if resolve is not None:
        metric = resolve(getattr(model, "tokenizer", None))
    arity = _positional_arity(metric)
    if arity == 0:
        raise GradGraphError(f"the metric takes no arguments; metric must be a function {SIGNATURE}")
    if arity == 1:
        plain = metric
        return lambda logits, attention_mask=None: plain(logits)
    return metric


def rows(metric, model, index: torch.Tensor, batch: int) -> Metric:
    """``metric`` (prepared for ``model``) on rows ``index`` of a batch of ``batch`` prompts, each row
    read as that prompt (its ids, its position): the rows' logits are placed among zero rows of the
    whole batch and the metric's values at ``index`` taken (a metric reads each row by itself)."""
    metric = prepare(metric, model)
    index = torch.as_tensor(index, dtype=torch.long)

    def placed(values: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        full = values.new_full((batch, *values.shape[1:]), fill)
        return full.index_copy(0, index.to(values.device), values)

    if isinstance(metric, AtPosition):
        pos = metric.pos[index] if isinstance(metric.pos, torch.Tensor) and metric.pos.ndim else metric.pos
        return AtPosition(pos, lambda at: metric.of(placed(at))[index.to(at.device)])

    def each(logits: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = None if attention_mask is None else placed(attention_mask, 1)
        return metric(placed(logits), mask)[index.to(logits.device)]

    return each


def tiled(metric, model, copies: int, batch: int) -> Metric:
    """``metric`` (prepared for ``model``) on ``copies`` stacked copies of a batch of ``batch``
    prompts ``[copies · batch, ...]``: each block of rows read as the batch (its ids, its positions);
    an ``AtPosition`` metric stays one, so that a recording computes the logits where it reads only."""
    metric = prepare(metric, model)
    if isinstance(metric, AtPosition):
        pos = metric.pos.repeat(copies) if isinstance(metric.pos, torch.Tensor) and metric.pos.ndim else metric.pos
        return AtPosition(pos, lambda at: torch.cat([metric.of(block) for block in at.split(batch)]))

    def each(logits: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        masks = [None] * copies if attention_mask is None else attention_mask.split(batch)
        return torch.cat([metric(block, m) for block, m in zip(logits.split(batch), masks)])

    return each


def _positional_arity(fn) -> int | None:
    """How many positional arguments ``fn`` accepts (2 for "two or more"; None if unknown)."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in parameters):
        return 2
    return min(2, sum(p.kind in kinds for p in parameters))


def _is_words(value) -> bool:
    return isinstance(value, str) or (isinstance(value, (list, tuple)) and bool(value) and
                                      all(isinstance(v, str) for v in value))


def _with_words(builder, good, bad, pos) -> Metric:
    """A metric naming words: calling it before ``prepare`` resolved them is an error."""
    def ids(tokenizer, words) -> int | torch.Tensor:
        if isinstance(words, str):
            return single_token_id(tokenizer, words)
        if _is_words(words):
            return torch.tensor([single_token_id(tokenizer, w) for w in words])
        return words

    def metric(logits: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        raise GradGraphError(
            f"{builder.__name__}({good!r}, {bad!r}) names words: pass it to build_graph (or any gradgraph "
            f"function taking a metric), which looks them up with the model's tokenizer, or call "
            f"metric.resolve(model.tokenizer)"
        )

    metric.resolve = lambda tokenizer: builder(ids(tokenizer, good), ids(tokenizer, bad), pos)
    return metric


def _ids(ids: int | torch.Tensor, name: str) -> torch.Tensor:
    if isinstance(ids, bool) or not isinstance(ids, (int, torch.Tensor)):
        raise GradGraphError(
            f"{name} must be a token id (int), a [batch] tensor of ids, or a word (str), got {type(ids).__name__}"
        )
    tensor = torch.as_tensor(ids, dtype=torch.long)
    if tensor.ndim > 1:
        raise GradGraphError(f"{name} must be an int or a [batch] tensor, got shape {tuple(tensor.shape)}")
    return tensor


def resolve_positions(pos: int | torch.Tensor, lengths: torch.Tensor, *, what: str = "") -> torch.Tensor:
    """``[batch]`` absolute positions: negative ``pos`` counts back from each row's length.

    Positions outside a prompt raise ``GradGraphError``.
    """
    position = torch.as_tensor(pos, device=lengths.device, dtype=torch.long).expand(lengths.shape[0])
    position = torch.where(position < 0, lengths + position, position)
    outside = (position < 0) | (position >= lengths)
    if outside.any():
        row = int(outside.nonzero()[0])
        given = int(torch.as_tensor(pos).flatten()[0 if torch.as_tensor(pos).ndim == 0 else row])
        raise GradGraphError(
            f"{what + ' ' if what else ''}position {given} is outside prompt {row}, which has "
            f"{int(lengths[row])} tokens; use a position in [-{int(lengths[row])}, {int(lengths[row])})"
        )
    return position


def select_positions(
    logits: torch.Tensor, pos: int | torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """``logits[b, pos_b]`` for each batch row: ``[batch, vocab]``.

    ``pos`` is an int or a ``[batch]`` tensor; negative values count back from the row's last
    real token. Positions outside a prompt raise ``GradGraphError``.
    """
    if logits.ndim != 3:
        raise GradGraphError(f"a metric takes logits [batch, pos, vocab], got shape {tuple(logits.shape)}")
    batch, width, _ = logits.shape
    lengths = (
        torch.full((batch,), width, device=logits.device, dtype=torch.long)
        if attention_mask is None
        else attention_mask.to(logits.device).long().sum(-1)
    )
    position = resolve_positions(pos, lengths, what="metric")
    return logits[torch.arange(batch, device=logits.device), position]


Tokens = int | torch.Tensor | str | list[str]


@dataclass(frozen=True, eq=False)
class AtPosition:
    """A metric that reads one position per row: ``of(logits[b, pos_b] [batch, vocab]) -> [batch]``.
    A caller that knows it can compute the logits at those positions only (``positions``); called
    on the whole ``[batch, pos, vocab]`` it is the same function."""

    pos: int | torch.Tensor
    of: Callable[[torch.Tensor], torch.Tensor]

    def __call__(self, logits: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.of(select_positions(logits, self.pos, attention_mask))

    def positions(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[batch]`` absolute positions read, for the prompts of ``attention_mask`` ``[batch, pos]``."""
        return resolve_positions(self.pos, attention_mask.long().sum(-1), what="metric")


def logit_diff(good: Tokens, bad: Tokens, pos: int | torch.Tensor = -1) -> Metric:
    """``logit[good] - logit[bad]`` at ``pos``: the SVA quantity for a causal LM.

    ``good`` / ``bad``: a token id, a ``[batch]`` tensor of ids, a word (``" are"``) or a list of
    words, one per prompt; a word must be one token."""
    if _is_words(good) or _is_words(bad):
        return _with_words(logit_diff, good, bad, pos)
    good_ids, bad_ids = _ids(good, "good"), _ids(bad, "bad")
    return AtPosition(pos, lambda at: _pick(at, good_ids) - _pick(at, bad_ids))  # at: [batch, vocab]


def logprob_diff(good: Tokens, bad: Tokens, pos: int | torch.Tensor = -1) -> Metric:
    """``log p(good) - log p(bad)`` at ``pos`` (ids or words, as for ``logit_diff``)."""
    if _is_words(good) or _is_words(bad):
        return _with_words(logprob_diff, good, bad, pos)
    good_ids, bad_ids = _ids(good, "good"), _ids(bad, "bad")

    def of(at: torch.Tensor) -> torch.Tensor:  # [batch, vocab]
        at = at.log_softmax(-1)
        return _pick(at, good_ids) - _pick(at, bad_ids)

    return AtPosition(pos, of)


def _pick(at: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``at[b, ids_b]``; ``at`` is ``[batch, vocab]``, ``ids`` a scalar or ``[batch]``."""
    batch, vocab = at.shape
    ids = ids.to(at.device)
    if ids.ndim == 1 and ids.shape[0] != batch:
        raise GradGraphError(f"{ids.shape[0]} token ids for a batch of {batch}; give one id per prompt")
    if (ids < 0).any() or (ids >= vocab).any():
        raise GradGraphError(f"token id out of range [0, {vocab}): {ids.tolist()}")
    return at.gather(-1, ids.expand(batch)[:, None])[:, 0]


def mask_positions(model, tokens: torch.Tensor, mask_token_id: int | None = None) -> torch.Tensor:
    """``[batch]``: where each row of ``tokens`` ``[batch, pos]`` holds the model's ``[MASK]`` token
    (exactly one per row); ``mask_token_id`` overrides the tokenizer's (models without one)."""
    if mask_token_id is None:
        mask_token_id = getattr(getattr(model, "tokenizer", None), "mask_token_id", None)
    if mask_token_id is None:
        raise GradGraphError(
            "this model has no [MASK] token (its tokenizer defines none); a masked-token metric is for masked "
            "language models such as BERT: pass mask_token_id=, or read a causal model's next-token logits "
            "with logit_diff(good, bad, pos=-1)"
        )
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2:
        raise GradGraphError("tokens must be a [batch, pos] tensor of token ids")
    found = tokens == int(mask_token_id)
    counts = found.sum(1)
    if (counts != 1).any():
        row = int((counts != 1).nonzero()[0])
        raise GradGraphError(f"row {row} holds {int(counts[row])} [MASK] tokens (id {int(mask_token_id)}); "
                             f"a masked-token metric reads exactly one per row")
    return found.long().argmax(1)


def masked_logit_diff(model, tokens: torch.Tensor, good: Tokens, bad: Tokens, *,
                      mask_token_id: int | None = None) -> Metric:
    """``logit[good] − logit[bad]`` at each row's ``[MASK]`` token: Du et al.'s SVA quantity for a
    masked LM ("The keys to the cabinet [MASK] here", good " are", bad " is")."""
    return logit_diff(good, bad, pos=mask_positions(model, tokens, mask_token_id))
