"""q / k / v / skip shares at each layer's attention input (Du et al. 2023, §6)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gradgraph.backprop import backprop
from gradgraph.errors import GradGraphError
from gradgraph.graph import GradGraph
from gradgraph.labels import Registry
from gradgraph.metrics import resolve_positions
from gradgraph.semirings import Max, Semiring

BRANCHES = ("q", "k", "v", "skip")
AGGREGATIONS = ("oplus", "bucket_sum", "sum")


@dataclass
class BranchShares:
    """Per layer, how the top-path (or flow) value at a position's attention input splits into the
    query, key, value and skip branches, averaged over the batch.

    ``value[l]`` is ``[4]`` (q, k, v, skip); ``share[l] = value[l] / value[l].sum()``;
    ``head_value[branch]`` is ``[n_layers, copies]`` (query heads for q, key/value heads for k, v).
    """

    value: torch.Tensor  # [n_layers, 4]
    head_value: dict[str, torch.Tensor]
    agg: str
    semiring: str

    @property
    def share(self) -> torch.Tensor:
        total = self.value.sum(-1, keepdim=True)
        return torch.where(total > 0, self.value / torch.where(total > 0, total, 1), 0)

    def rows(self) -> list[dict]:
        out = []
        share = self.share
        for layer in range(self.value.shape[0]):
            total = float(self.value[layer].sum())
            for i, branch in enumerate(BRANCHES):
                out.append(dict(layer=layer, branch=branch, head="all", value=float(self.value[layer, i]),
                                share=float(share[layer, i])))
            for branch, per_head in self.head_value.items():
                for h in range(per_head.shape[1]):
                    out.append(dict(layer=layer, branch=branch, head=h, value=float(per_head[layer, h]),
                                    share=float(per_head[layer, h]) / total if total > 0 else 0.0))
        return out

    @staticmethod
    def mean(parts: list[tuple["BranchShares", int]]) -> "BranchShares":
        """The average of several batches' shares, weighted by their item counts."""
        total = sum(n for _, n in parts)
        value = sum(s.value * n for s, n in parts) / total
        heads = {k: sum(s.head_value[k] * n for s, n in parts) / total for k in parts[0][0].head_value}
        return BranchShares(value, heads, parts[0][0].agg, parts[0][0].semiring)


def _check(semiring: Semiring, agg: str) -> None:
    if agg not in AGGREGATIONS:
        raise GradGraphError(f"agg must be one of {AGGREGATIONS}, got {agg!r}")
    ok = semiring.size == 1 and (semiring.selective if agg != "sum" else semiring.additive)
    if not ok:
        raise GradGraphError(
            f"branch_shares takes semiring=Max with agg 'oplus' or 'bucket_sum' (a ⊕ that picks one path), "
            f"or Abs / Real with agg 'sum'; got {semiring.name} with {agg!r}"
        )


def branch_shares(
    graph: GradGraph,
    position: int | torch.Tensor,
    *,
    semiring: Semiring = Max,
    agg: str = "oplus",
    values: dict[str, torch.Tensor] | None = None,
    include: torch.Tensor | None = None,
) -> BranchShares:
    """q / k / v / skip shares of the value at each layer's attention input at ``position``.

    ``position``: an int (negative counts back from each prompt's last token) or a ``[batch]``
    tensor (e.g. each item's subject position). The branch values at residual unit i are the
    backward values of the q-input copies (one per query head), the k and v inputs (one per
    key/value head) and the skip (``hook_resid_mid``), all reached by weight-1 edges.

    - ``agg="oplus"``: the single ⊕-maximum over units and branches goes to its branch (and head);
    - ``agg="bucket_sum"``: each unit's maximum goes to its branch, summed over units;
    - ``agg="sum"`` (for ``Abs`` flows): every branch keeps the sum of its values.

    ``values`` may pass precomputed ``backprop(graph, semiring)`` output; ``include`` ([batch]
    bool) restricts the average to some items.
    """
    _check(semiring, agg)
    pos = resolve_positions(torch.as_tensor(position).cpu(), graph.attention_mask.sum(-1).cpu())
    if values is None:
        values = backprop(graph, semiring, dtype=semiring.safe_dtype)
    batch = torch.arange(graph.batch_size)
    n_layers, H, G = graph.n_layers, graph.n_heads, graph.n_key_value_heads
    total = torch.zeros(n_layers, 4, dtype=torch.float64)
    heads = {"q": torch.zeros(n_layers, H, dtype=torch.float64), "k": torch.zeros(n_layers, G, dtype=torch.float64),
             "v": torch.zeros(n_layers, G, dtype=torch.float64)}
    branch_of = torch.tensor([0] * H + [1] * G + [2] * G + [3])
    reg = Registry.of(graph)
    for layer in range(n_layers):
        # candidates [batch, copies, d]: q heads, k heads, v heads, skip
        nodes = reg.branch_nodes(layer)
        parts = [values[nodes[c]][0][batch, pos].abs() for c in ("q", "k", "v")]
        skip = values[nodes["skip"]][0][batch, pos].abs()[:, None]
        stacked = torch.cat(parts + [skip], dim=1).double().cpu()  # [batch, H + 2G + 1, d]
        for b in range(graph.batch_size):
            if include is not None and not include[b]:
                continue
            cand = stacked[b]  # [copies, d]
            if agg == "sum":
                per_copy = cand.sum(-1)
            elif agg == "bucket_sum":
                best, winner = cand.max(0)  # per unit
                per_copy = torch.zeros(cand.shape[0], dtype=torch.float64).index_add_(0, winner, best)
            else:
                flat = int(cand.argmax())
                per_copy = torch.zeros(cand.shape[0], dtype=torch.float64)
                per_copy[flat // cand.shape[1]] = cand.reshape(-1)[flat]
            total[layer] += torch.zeros(4, dtype=torch.float64).index_add_(0, branch_of, per_copy)
            heads["q"][layer] += per_copy[:H]
            heads["k"][layer] += per_copy[H : H + G]
            heads["v"][layer] += per_copy[H + G : H + 2 * G]
    n = graph.batch_size if include is None else max(1, int(include.sum()))
    return BranchShares(total / n, {k: v / n for k, v in heads.items()}, agg, semiring.name)
