"""Where a command runs: ``choose(text)`` turns ``--device`` into a ``torch.device`` this machine has.

Default (None or ``"auto"``): the first GPU when torch sees one, else the CPU. The graph engine runs
anywhere torch does: on the CPU the max–times products use the numba kernels, elsewhere their torch
equivalents (``gradgraph.kernels.available``; tested equal).
"""

from __future__ import annotations

import torch

from gradgraph.errors import GradGraphError

KINDS = ("cpu", "cuda", "mps")


def choose(text: str | torch.device | None = None) -> torch.device:
    """The device ``text`` names (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``, ``"auto"``/None),
    or ``GradGraphError`` saying why this machine cannot run there."""
    if text is None or text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError):
        raise GradGraphError(f"unknown device {text!r}: use one of {', '.join(KINDS)} (cuda:N for the N-th GPU) "
                             f"or auto") from None
    if device.type not in KINDS:
        raise GradGraphError(f"gradgraph runs on {', '.join(KINDS)}, not {device.type!r}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise GradGraphError(f"device {text!r}: torch sees no CUDA GPU on this machine (torch "
                                 f"{torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= count:
            raise GradGraphError(f"device {text!r}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise GradGraphError(f"device {text!r}: this machine has no Apple GPU (MPS); use --device cpu")
    return device


__all__ = ["KINDS", "choose"]
