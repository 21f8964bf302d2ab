"""Rotary position embeddings: the one rotation (TransformerLens' arithmetic), for the forward
passes from the weights and for the q/k rotation a bridge does not record."""

from __future__ import annotations

import torch


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, adjacent: bool) -> torch.Tensor:
    """Rotary embedding of ``x`` ``[n, s, heads, e]`` at the positions of ``cos``/``sin`` ``[s, rd]``."""
    rd = cos.shape[-1]
    rot, rest = x[..., :rd], x[..., rd:]
    flip = torch.empty_like(rot)
    if adjacent:
        flip[..., ::2], flip[..., 1::2] = -rot[..., 1::2], rot[..., ::2]
    else:
        n = rd // 2
        flip[..., :n], flip[..., n:] = -rot[..., n:], rot[..., :n]
    return torch.cat([rot * cos[None, :, None] + flip * sin[None, :, None], rest], -1)


__all__ = ["rotate"]
