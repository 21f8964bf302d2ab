"""Quantities of interest: functions from logits ``[batch, pos, vocab]`` to ``[batch]``.

A metric is a callable ``metric(logits, attention_mask=None) -> Tensor[batch]``. Positions
count from the start of each prompt; a negative ``pos`` counts back from each prompt's last
real token (found from ``attention_mask``, so right-padded batches work).
"""

from __future__ import annotations

from typing import Callable

import torch

from gradgraph.errors import GradGraphError

Metric = Callable[..., torch.Tensor]


def _ids(ids: int | torch.Tensor, name: str) -> torch.Tensor:
    if isinstance(ids, bool) or not isinstance(ids, (int, torch.Tensor)):
        raise GradGraphError(f"{name} must be a token id (int) or a [batch] tensor of ids, got {type(ids).__name__}")
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


def logit_diff(good: int | torch.Tensor, bad: int | torch.Tensor, pos: int | torch.Tensor = -1) -> Metric:
    """``logit[good] - logit[bad]`` at ``pos``: the SVA quantity for a causal LM."""
    good_ids, bad_ids = _ids(good, "good"), _ids(bad, "bad")

    def metric(logits: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        at = select_positions(logits, pos, attention_mask)  # [batch, vocab]
        return _pick(at, good_ids) - _pick(at, bad_ids)

    return metric


def logprob_diff(good: int | torch.Tensor, bad: int | torch.Tensor, pos: int | torch.Tensor = -1) -> Metric:
    """``log p(good) - log p(bad)`` at ``pos``."""
    good_ids, bad_ids = _ids(good, "good"), _ids(bad, "bad")

    def metric(logits: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        at = select_positions(logits, pos, attention_mask).log_softmax(-1)
        return _pick(at, good_ids) - _pick(at, bad_ids)

    return metric


def _pick(at: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``at[b, ids_b]``; ``at`` is ``[batch, vocab]``, ``ids`` a scalar or ``[batch]``."""
    batch, vocab = at.shape
    ids = ids.to(at.device)
    if ids.ndim == 1 and ids.shape[0] != batch:
        raise GradGraphError(f"{ids.shape[0]} token ids for a batch of {batch}; give one id per prompt")
    if (ids < 0).any() or (ids >= vocab).any():
        raise GradGraphError(f"token id out of range [0, {vocab}): {ids.tolist()}")
    return at.gather(-1, ids.expand(batch)[:, None])[:, 0]
