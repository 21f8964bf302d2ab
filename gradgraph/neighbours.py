"""Nearest vocabulary embeddings: the KNN graph DIG walks, and the neighbours of arbitrary points
that UDIG looks up (REFERENCES.md §3–§4).

Distances are Euclidean over the rows of ``W_E`` (every token, special tokens included, as DIG's
code does); a word is not its own neighbour; neighbours come nearest first, ties by token id.
The graph of a real model is computed once and kept in ``cache_dir()/neighbours`` under a digest of
the embedding matrix, so that a changed model never reads a stale file.
"""

from __future__ import annotations

import hashlib
import os
import tempfile

import torch
from tqdm.auto import tqdm

from gradgraph.arch.models import cache_dir
from gradgraph.errors import GradGraphError

CACHED_FROM = 4096  # vocabularies at least this large are cached on disk (smaller ones take milliseconds)


def _embeddings(model) -> torch.Tensor:
    return model.W_E.detach().float()  # [vocab, d_model]


def nearest(model, points: torch.Tensor, k: int, *, chunk: int = 1024) -> torch.Tensor:
    """``[n, k]`` ids of the ``k`` vocabulary embeddings nearest to each of ``points`` ``[n, d_model]``."""
    W = _embeddings(model)
    if not 0 < k <= W.shape[0]:
        raise GradGraphError(f"k must be in 1..{W.shape[0]} (the vocabulary size), got {k}")
    squared = (W * W).sum(1)  # [vocab]
    out = []
    for start in range(0, len(points), chunk):
        p = points[start:start + chunk].float()
        distance = squared[None] - 2 * p @ W.T  # + |p|², the same for every row
        out.append(torch.topk(distance, k, dim=1, largest=False, sorted=True).indices)
    return torch.cat(out)


def vocabulary_neighbours(model, k: int = 500, *, progress: bool = True) -> torch.Tensor:
    """``[vocab, k]`` (int32): each token's ``k`` nearest other tokens, nearest first (DIG's KNN graph,
    500 neighbours by default). Cached on disk for large vocabularies; built in chunks otherwise."""
    W = _embeddings(model)
    vocab = W.shape[0]
    if not 0 < k < vocab:
        raise GradGraphError(f"k must be in 1..{vocab - 1} (the vocabulary size minus one), got {k}")
    path = None
    if vocab >= CACHED_FROM:
        digest = hashlib.sha256(W.numpy().tobytes()).hexdigest()[:16]
        path = cache_dir() / "neighbours" / f"{digest}-k{k}.pt"
        if path.exists():
            return torch.load(path, weights_only=True)
    squared = (W * W).sum(1)
    rows = []
    chunks = range(0, vocab, 1024)
    for start in tqdm(chunks, desc="vocabulary neighbours", unit="chunk", disable=not progress or path is None):
        p = W[start:start + 1024]
        distance = squared[None] - 2 * p @ W.T  # [chunk, vocab] (+ |p|², constant per row)
        distance[torch.arange(len(p)), torch.arange(start, start + len(p))] = float("inf")  # not itself
        rows.append(torch.topk(distance, k, dim=1, largest=False, sorted=True).indices.int())
    out = torch.cat(rows)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".part", delete=False) as handle:
            torch.save(out, handle)
        os.replace(handle.name, path)  # atomic: a reader never sees half a file
    return out


__all__ = ["nearest", "vocabulary_neighbours"]
