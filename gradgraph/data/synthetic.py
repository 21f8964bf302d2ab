"""Synthetic tasks with a known answer (Du et al. 2023, §5.1), read at the last position of a causal
model.

- ``first_token_repeated``: does the first token occur again? (Du et al.'s FirstTokenRepeatedOnce:
  vocabulary 1..vocab-1, balanced labels, a "yes" sequence repeats the first token exactly once.)
  The model answers with one of two extra token ids, ``answer_ids(vocab) = (no, yes) = (vocab,
  vocab + 1)``, so its ``d_vocab`` is ``vocab + 2``. With ``reverse=True`` every sequence is
  flipped: the tested token sits at the reading position.
- ``induction``: distinct random tokens, the last one a copy of an earlier token x_i; the answer
  is x_{i+1}.
"""

from __future__ import annotations

import torch

from gradgraph.errors import GradGraphError


def answer_ids(vocab: int) -> tuple[int, int]:
    """The (no, yes) answer token ids of the first-token task: ``(vocab, vocab + 1)``."""
    return vocab, vocab + 1


def first_token_repeated(
    n: int, *, seq_len: int = 10, vocab: int = 20, seed: int = 0, reverse: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens [n, seq_len], labels [n])``: label 1 iff ``tokens[0]`` occurs again in ``tokens[1:]``.

    Tokens lie in ``1..vocab-1`` (0 is never used); labels are balanced (``n // 2`` ones, shuffled).
    A "no" sequence draws its other tokens from the vocabulary without the first token; a "yes"
    sequence does the same and then puts the first token at one random later position. With
    ``reverse`` each sequence is flipped (the label then says whether the *last* token occurs
    earlier).
    """
    if n < 2 or seq_len < 2 or vocab < 3:
        raise GradGraphError(f"first_token_repeated needs n >= 2, seq_len >= 2, vocab >= 3; got {n}, {seq_len}, {vocab}")
    g = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) < n // 2).long()[torch.randperm(n, generator=g)]
    first = torch.randint(1, vocab, (n,), generator=g)
    rest = torch.randint(1, vocab - 1, (n, seq_len - 1), generator=g)
    rest = rest + (rest >= first[:, None]).long()  # uniform over 1..vocab-1 without `first`
    where = torch.randint(0, seq_len - 1, (n,), generator=g)
    yes = labels.bool()
    rest[yes, where[yes]] = first[yes]
    tokens = torch.cat([first[:, None], rest], 1)
    return (tokens.flip(-1) if reverse else tokens), labels


def induction(
    n: int, *, seq_len: int = 12, vocab: int = 24, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(tokens [n, seq_len], targets [n], source [n])`` for in-context copying (induction).

    ``tokens[:, :-1]`` are distinct tokens from ``0..vocab-1``; the last token repeats the one at
    a random position i ≤ seq_len − 3; the target is the token after it, at ``source = i + 1``.
    """
    if seq_len < 3 or vocab < seq_len - 1:
        raise GradGraphError(f"induction needs seq_len >= 3 and vocab >= seq_len - 1; got {seq_len}, {vocab}")
    g = torch.Generator().manual_seed(seed)
    prefix = torch.rand(n, vocab, generator=g).argsort(-1)[:, : seq_len - 1]
    trigger = torch.randint(0, seq_len - 2, (n,), generator=g)
    rows = torch.arange(n)
    tokens = torch.cat([prefix, prefix[rows, trigger][:, None]], 1)
    return tokens, prefix[rows, trigger + 1], trigger + 1


def unseen(tokens: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """``[n]`` bool: which rows of ``tokens`` are not rows of ``seen`` (held-out data without
    the sequences that also occur in the training set)."""
    known = {tuple(row) for row in seen.tolist()}
    return torch.tensor([tuple(row) not in known for row in tokens.tolist()], dtype=torch.bool)
