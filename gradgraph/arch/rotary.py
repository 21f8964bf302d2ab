"""Rotary position embeddings: the one rotation (TransformerLens' arithmetic), for the forward
passes from the weights and for the q/k rotation a bridge does not record."""

from __future__ import annotations

import torch


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, adjacent: bool) -> torch.Tensor:
    """Rotary embedding of ``x`` ``[n, s, heads, e]`` at the positions of ``cos``/``sin`` ``[s, rd]``."""
    rd = cos.shape[-1]
    rot = x[..., :rd]
    if adjacent:  # pairs (0, 1), (2, 3), ...: (-x1, x0, -x3, x2, ...)
        flip = torch.stack([-rot[..., 1::2], rot[..., ::2]], -1).flatten(-2)
    else:  # halves: (-x[n:], x[:n])
        flip = torch.cat([-rot[..., rd // 2:], rot[..., :rd // 2]], -1)
    turned = rot * cos[None, :, None] + flip * sin[None, :, None]
    return turned if rd == x.shape[-1] else torch.cat([turned, x[..., rd:]], -1)


__all__ = ["rotate"]
