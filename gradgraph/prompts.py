"""Turning prompts into token batches, with the checks every public entry point needs."""

from __future__ import annotations

from pathlib import Path

import torch

from gradgraph.arch.lens import Model
from gradgraph.errors import GradGraphError


def single_token_id(tokenizer, word: str) -> int:
    """The id of ``word`` (e.g. ``" are"``) if it is exactly one token, else ``GradGraphError``."""
    if tokenizer is None:
        raise GradGraphError(f"cannot look up {word!r}: the model has no tokenizer; pass token ids instead")
    ids = tokenizer.encode(word, add_special_tokens=False)
    if len(ids) != 1:
        pieces = [tokenizer.decode([i]) for i in ids]
        raise GradGraphError(
            f"{word!r} is {len(ids)} tokens {pieces} for this tokenizer, not one; "
            f"choose a word that is a single token (mind the leading space, e.g. ' are')"
        )
    return ids[0]


def right_pad(rows: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id sequences of any lengths -> ``(tokens [batch, pos], attention_mask [batch, pos])``,
    right-padded with id 0 (causal attention never sees the padding after a sequence)."""
    width = max(len(r) for r in rows)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return tokens, mask


def to_tokens(
    model: Model, prompts: str | list[str] | torch.Tensor, *, prepend_bos: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise and right-pad: ``(tokens [batch, pos], attention_mask [batch, pos])``.

    Right padding keeps every real token at its true position (causal attention never looks
    at the padding after it), so logits at real positions are exactly the unpadded ones.
    A tensor is taken as token ids with no padding.
    """
    n_ctx = model.cfg.n_ctx
    if isinstance(prompts, torch.Tensor):
        tokens = prompts
        if tokens.ndim == 1:
            tokens = tokens[None]
        if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] == 0:
            raise GradGraphError(
                f"tokens must be a non-empty [batch, pos] tensor, got shape {tuple(prompts.shape)}"
            )
        if tokens.dtype not in (torch.int32, torch.int64):
            raise GradGraphError(f"tokens must be integer ids, got dtype {tokens.dtype}")
        if tokens.min() < 0 or tokens.max() >= model.cfg.d_vocab:
            raise GradGraphError(
                f"token ids must lie in [0, {model.cfg.d_vocab}), got [{int(tokens.min())}, {int(tokens.max())}]"
            )
        mask = torch.ones_like(tokens)
    else:
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not texts:
            raise GradGraphError("no prompts given: pass a string or a non-empty list of strings")
        if model.tokenizer is None:
            raise GradGraphError("this model has no tokenizer; pass a [batch, pos] tensor of token ids")
        bos = model.cfg.default_prepend_bos if prepend_bos is None else prepend_bos
        rows = []
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise GradGraphError(f"prompt {i} is empty ({text!r}); give every prompt some text")
            ids = model.tokenizer.encode(text, add_special_tokens=False)
            if bos and model.tokenizer.bos_token_id is not None:
                ids = [model.tokenizer.bos_token_id] + ids
            rows.append(ids)
        width = max(len(r) for r in rows)
        pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
        tokens = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, ids in enumerate(rows):
            tokens[i, : len(ids)] = torch.tensor(ids)
            mask[i, : len(ids)] = 1
    if tokens.shape[1] > n_ctx:
        raise GradGraphError(
            f"prompt of {tokens.shape[1]} tokens is longer than the model's context ({n_ctx}); shorten it"
        )
    device = model.cfg.device
    return tokens.to(device), mask.to(device)


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line; an empty line is an error (it would silently shift any pairing)."""
    path = Path(path)
    if not path.is_file():
        raise GradGraphError(f"prompts file {path} does not exist")
    lines = path.read_text().splitlines()
    while lines and not lines[-1].strip():
        lines.pop()  # trailing newlines are fine
    empty = [n + 1 for n, line in enumerate(lines) if not line.strip()]
    if empty:
        raise GradGraphError(f"{path} has empty line(s) {empty[:5]}; give one non-empty prompt per line")
    if not lines:
        raise GradGraphError(f"{path} has no prompts")
    return lines
