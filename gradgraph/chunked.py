"""One layer's attention, a chunk of query rows at a time: a long prompt's passes in memory linear
in its length per head.

Between a layer's queries ``q`` ``[B, Q, H, e]``, keys and values ``[B, K, G, e]`` and its head
outputs ``z`` ``[B, Q, H, e]``, every block is row-local in the queries: row ``i`` of the scores,
the pattern and ``z`` reads query ``i`` alone (and the keys and values). A pass can therefore go
through a ``Region`` chunk by chunk, as memory-efficient attention does: each chunk's blocks are
formed from its queries and the keys (scores and pattern recomputed, ``[B, H, rows, K]``), its
rows of the value at ``z`` (backward) or of the queries (forward) go through them, the queries'
contributions are the chunks' rows side by side and the keys' and values' are ⊕-summed over the
chunks (within one block: the block semiring's ⊕). A causal chunk reads the keys up to its last
row only. Results equal the unchunked blocks' up to the order of ⊕ (exact for Max; float rounding
for the sums). The graph keeps the unchunked blocks (edge listings, path search, passes that keep
the pattern); ``gradgraph.backprop`` runs the regions instead of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from gradgraph.graph import Block
from gradgraph.semirings import Semiring

AXIS = 2  # the query (z, q) or key (k, v) axis of a value [S, B, positions, heads, e]


@dataclass(frozen=True, eq=False)
class Region:
    """The blocks from ``queries``, ``keyed`` (keys, values) into ``inner`` (scores, pattern, in the
    graph's order) and ``target`` (z); ``chunk(rows, keys)`` makes them for query ``rows`` and the
    first ``keys`` keys; ``keys_read(end)``: the keys rows before ``end`` read."""

    layer: int
    queries: str
    keyed: tuple[str, ...]
    inner: tuple[str, ...]
    target: str
    blocks: tuple[Block, ...]  # the graph's own (unchunked) blocks, which a chunked pass skips
    chunk: Callable[[slice, int], list[Block]]
    n_rows: int
    rows: int  # query rows per chunk
    keys_read: Callable[[int], int]

    @property
    def sources(self) -> tuple[str, ...]:
        return (self.queries, *self.keyed)

    def _chunks(self):
        for start in range(0, self.n_rows, self.rows):
            end = min(start + self.rows, self.n_rows)
            keys = self.keys_read(end)
            yield slice(start, end), keys, self.chunk(slice(start, end), keys)

    def backward(self, sr: Semiring, inner: Semiring, value: torch.Tensor) -> dict[str, torch.Tensor]:
        """Value ``[S, B, Q, H, e]`` at ``target`` → each source's contribution (``sr`` combines
        blocks at a node, ``inner`` within a block: ``backprop``'s two)."""
        parts: dict[int, list | torch.Tensor] = {}  # per source block (its index in a chunk's list)
        n_keys = self.keys_read(self.n_rows)
        for rows, keys, blocks in self._chunks():
            values = {self.target: value[:, :, rows]}
            for node in reversed(self.inner):
                values[node] = _total(sr, [b.backward(inner, values[b.tgt]) for b in blocks
                                           if b.src == node and values.get(b.tgt) is not None])
            for index, block in enumerate(blocks):
                if block.src in self.inner or values.get(block.tgt) is None:
                    continue
                part = block.backward(inner, values[block.tgt])
                if block.src == self.queries:  # its rows
                    parts.setdefault(index, []).append(part)
                    continue
                total = parts.get(index)  # [S, B, K, G, e]
                if keys == n_keys:
                    parts[index] = part if total is None else inner.plus(total, part)
                    continue
                if total is None:  # the region's own tensor: the keys no chunk read yet are zeros
                    total = parts[index] = _zeros(inner, part, (part.shape[1], n_keys, *part.shape[3:]))
                total[:, :, :keys] = inner.plus(total[:, :, :keys], part)  # ⊕ into the keys this chunk read
        out: dict[str, torch.Tensor] = {}
        for index, part in parts.items():
            src = blocks[index].src
            part = torch.cat(part, AXIS) if isinstance(part, list) else part
            out[src] = part if src not in out else sr.plus(out[src], part)
        return out

    def forward(self, sr: Semiring, inner: Semiring, sources: dict[str, torch.Tensor | None]) -> torch.Tensor | None:
        """The sources' values ``[S, B, positions, heads, e]`` → the contribution at ``target``."""
        out = []
        for rows, keys, blocks in self._chunks():
            values = {self.queries: None if sources[self.queries] is None else sources[self.queries][:, :, rows]}
            values.update({n: None if sources[n] is None else sources[n][:, :, :keys] for n in self.keyed})
            for node in (*self.inner, self.target):
                values[node] = _total(sr, [b.forward(inner, values[b.src]) for b in blocks
                                           if b.tgt == node and values.get(b.src) is not None])
            out.append(values[self.target])
        return None if out[0] is None else torch.cat(out, AXIS)  # every chunk has the same blocks: all or none reached


def _total(sr: Semiring, parts: list[torch.Tensor]) -> torch.Tensor | None:
    total = None
    for part in parts:
        total = part if total is None else sr.plus(total, part)
    return total


def _zeros(sr: Semiring, like: torch.Tensor, shape) -> torch.Tensor:
    """The semiring's zero ``[S, *shape]``, a new tensor (``like``'s dtype and device)."""
    return sr.zero(tuple(shape), dtype=like.dtype, device=like.device)


def skipped(regions: tuple[Region, ...]) -> set[int]:
    """The ids of the blocks that chunked regions run in their place."""
    return {id(block) for region in regions for block in region.blocks}


__all__ = ["Region", "skipped"]
