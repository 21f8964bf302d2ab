"""``Attribution``: the one result type every attribution method returns (scores per token, the
value at every node, the method's own error), and which positions an attribution leaves alone."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch

from gradgraph.components import component_values
from gradgraph.errors import GradGraphError
from gradgraph.graph import GradGraph
from gradgraph.labels import KINDS
from gradgraph.semirings import Real


@dataclass(frozen=True, eq=False)
class Attribution:
    """Per-token scores of one method, the value at every graph node, and the method's own error.

    ``target`` is what complete scores sum to (LRP: the metric value; integrated gradients:
    F(input) − F(baseline)) and ``delta = scores.sum(1) − target`` is always filled in.
    ``cut_deltas``: the same at every residual-stream cut (each layer's ``hook_resid_pre`` and
    ``hook_resid_mid``, the last ``hook_resid_post``), where every input → metric path passes."""

    method: str
    tokens: torch.Tensor  # [batch, pos]
    scores: torch.Tensor  # [batch, pos]: 0 at padding
    target: torch.Tensor  # [batch]
    delta: torch.Tensor  # [batch]
    values: Mapping[str, torch.Tensor] = field(repr=False)  # node -> [*node shape]
    graph: GradGraph | None = field(default=None, repr=False)
    cut_deltas: Mapping[str, torch.Tensor] = field(default_factory=dict, repr=False)  # node -> [batch]
    path: torch.Tensor | None = field(default=None, repr=False)  # [batch, steps, pos, d_model] where a path is used

    def by_component(self, kinds=KINDS) -> list[dict]:
        """Tidy rows ``{component, kind, layer, head, position, batch, value}``: the sum of the values
        of each component's elements (a head's output ``hook_z``, its q/k/v inputs, an MLP's output,
        the embeddings) at each real position."""
        if self.graph is None:
            raise GradGraphError(f"{self.method}: no graph was kept, so there are no component values ("
                                 f"lrp keeps it with keep='all')")
        rows = component_values(self.graph, {n: v[None] for n, v in self.values.items()}, Real)
        return [r for r in rows if r["kind"] in kinds]


def kept_positions(model, ids: torch.Tensor, attribute_bos: bool, positions=None) -> torch.Tensor:
    """``[pos]`` bool: positions that keep their own token on every path (BOS, unless attributed;
    every position not in ``positions`` where given)."""
    keep = torch.zeros(len(ids), dtype=torch.bool)
    bos = getattr(model.tokenizer, "bos_token_id", None) if model.tokenizer is not None else None
    keep[0] = bool(model.cfg.default_prepend_bos and bos is not None and int(ids[0]) == bos and not attribute_bos)
    if positions is not None:
        chosen = torch.as_tensor(list(positions), dtype=torch.long)
        if len(chosen) == 0 or int(chosen.min()) < 0 or int(chosen.max()) >= len(ids):
            raise GradGraphError(f"positions must name token positions in 0..{len(ids) - 1}, got {list(positions)}")
        keep |= torch.ones(len(ids), dtype=torch.bool).index_fill(0, chosen, False)
    return keep


__all__ = ["Attribution", "kept_positions"]
