"""A circuit's faithfulness, as MIB measures it (Mueller et al. 2025).

``circuit_metric`` runs the model on the prompts with every edge outside the circuit carrying its
counterfactual value (or the prompts' mean) and every edge inside its own: at each downstream
input, ``r_d + Σ_{u→d ∉ C} (a_u(x′) − a_u)``, the upstream outputs ``a_u`` taken live in that run.
With every edge outside (the empty circuit) the run is the counterfactual's; with none outside, the
prompts'. ``f(C) = (m(C) − m(∅)) / (m(N) − m(∅))`` on the metric's mean over prompts.

``faithfulness_curve`` sweeps MIB's circuit sizes (``SIZES``, shares of the model's edges): at each,
the top ``int(share · edges)`` edges (pruned), and ``f``. CPR is the area under ``f`` (higher is
better; MIB selects by the signed score for it), CMD the area under ``|1 − f|`` (lower is better;
selected by |score|), by the trapezoid rule over the x-axis of a convention: ``"fixed"``, the
sizes asked for (MIB's leaderboard and its evaluation code), or ``"own"``, each pruned circuit's own
share of the edges (MIB's paper plots). Intervals: percentiles of the areas over prompts resampled
with replacement.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gradgraph.arch import names
from gradgraph.arch.lens import Model
from gradgraph.circuits import Circuit, top_edges
from gradgraph.edge_methods import _W_O, _downstream_nodes, _outputs, _recorded, _tokens
from gradgraph.edges import EdgeScores
from gradgraph.errors import GradGraphError
from gradgraph.metrics import prepare

SIZES = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
ABLATIONS = ("counterfactual", "mean")
CONVENTIONS = ("fixed", "own")


def circuit_metric(model: Model, tokens, counterfactual, metric, circuit: Circuit, *,
                   attention_mask: torch.Tensor | None = None, ablation: str = "counterfactual") -> torch.Tensor:
    """The metric per prompt ``[batch]`` with every edge outside ``circuit`` ablated (see the module);
    ``ablation="mean"`` gives those edges the mean over the prompts of the counterfactuals' upstream
    outputs at each position."""
    if not isinstance(circuit, Circuit):
        raise GradGraphError(f"expected a gradgraph.circuits.Circuit, got {type(circuit).__name__}")
    clean, mask, other = _ablated(model, tokens, counterfactual, metric, attention_mask, ablation, circuit.graph.registry)
    return _run(model, clean, mask, metric, circuit, other)


def _ablated(model: Model, tokens, counterfactual, metric, attention_mask, ablation: str, reg):
    """The prompts' tokens and mask, and the upstream outputs ``[b, p, U, d]`` ablated edges carry."""
    if ablation not in ABLATIONS:
        raise GradGraphError(f"ablation must be one of {ABLATIONS}, got {ablation!r}")
    clean, mask = _tokens(model, tokens, attention_mask)
    corrupt, _ = _tokens(model, counterfactual, attention_mask)
    if corrupt.shape != clean.shape:
        raise GradGraphError(f"counterfactual prompts must align with the prompts token by token: shapes "
                             f"{tuple(corrupt.shape)} and {tuple(clean.shape)}")
    with torch.no_grad():
        other = _outputs(model, _recorded(model, corrupt, metric, mask), reg)
    if ablation == "mean":
        other = other.mean(0, keepdim=True).expand_as(other).contiguous()
    return clean, mask, other


def _run(model: Model, clean: torch.Tensor, mask, metric, circuit: Circuit, other: torch.Tensor) -> torch.Tensor:
    """The hooked run: upstream outputs recorded live as their hook points fire (``other − live`` per
    upstream node, and its running sum over the nodes so far, in residual order), each downstream
    input shifted by the ablated edges into it: their sum directly, or, where the circuit keeps
    fewer edges into it than it ablates, the whole input's change less the kept ones."""
    graph = circuit.graph
    reg = graph.registry
    kept = (graph.adjacency & circuit.edges).to(other.dtype)  # [U, D]
    ablated = (graph.adjacency & ~circuit.edges).to(other.dtype)
    diff = torch.zeros_like(other)  # other − live, where written
    running = {0: torch.zeros_like(other[:, :, 0])}  # Σ of diff over the first k upstream nodes
    slots = _slots(graph)
    hooks = []

    def writes(at: slice, fn):
        def hook(x, hook=None):
            diff[:, :, at] = other[:, :, at] - fn(x)
            running[at.stop] = running[at.start] + diff[:, :, at].sum(2)
        return hook

    def reads(ds: list[int], head_dim: bool):
        k = int(graph.adjacency[:, ds[0]].sum())  # the upstream nodes written before these inputs
        out_rows, in_rows = (m[:k, ds].any(1).nonzero().squeeze(1) for m in (ablated, kept))
        by_kept = len(in_rows) < len(out_rows)
        rows = in_rows if by_kept else out_rows
        weights = (kept if by_kept else ablated)[rows][:, ds]  # [rows, len(ds)]

        def hook(x, hook=None):
            if not by_kept and not len(rows):  # nothing ablated into these inputs
                return x
            shift = torch.einsum("bpud,un->bpnd", diff[:, :, rows], weights)  # [b, p, len(ds), d]
            if by_kept:
                shift = running[k][:, :, None] - shift
            return x + (shift if head_dim else shift[:, :, 0])
        return hook

    hooks.append((names.name("resid_pre", 0), writes(slice(0, 1), lambda x: x[:, :, None])))
    for layer in range(reg.n_layers):
        W_O = _W_O(model, layer, other.dtype)
        hooks.append((names.name("z", layer), writes(slots[("head", layer)], lambda z, W=W_O: torch.einsum("bphe,hed->bphd", z, W))))
        if reg.mlps:
            hooks.append((names.name("mlp_out", layer), writes(slots[("mlp", layer)], lambda x: x[:, :, None])))
    for hook, (ds, head_dim) in _inputs(reg).items():
        hooks.append((hook, reads(ds, head_dim)))
    with torch.no_grad():
        logits = model.run_with_hooks(clean, fwd_hooks=hooks)
        return prepare(metric, model)(logits, mask).detach()


def _slots(graph) -> dict:
    """Where each layer's head and MLP outputs sit among the upstream nodes (slices of indices)."""
    reg, out = graph.registry, {}
    up = {label: i for i, label in enumerate(graph.upstream)}
    for layer in range(reg.n_layers):
        first = up[f"L{layer}H0"]
        out[("head", layer)] = slice(first, first + reg.n_heads)
        if reg.mlps:
            out[("mlp", layer)] = slice(up[f"MLP{layer}"], up[f"MLP{layer}"] + 1)
    return out


def _inputs(reg) -> dict[str, tuple[list[int], bool]]:
    """Per input hook point, the downstream indices it holds and whether it has a head axis."""
    out: dict[str, tuple[list[int], bool]] = {}
    for d, (hook, head) in enumerate(_downstream_nodes(reg)):
        out.setdefault(hook, ([], head is not None))[0].append(d)
    return out


@dataclass(frozen=True)
class Curve:
    """A faithfulness sweep: per size, the circuit's edges and share, its metric per prompt, and the
    ends: the prompts' metric ``m(N)`` and the empty circuit's ``m(∅)``, per prompt."""

    sizes: tuple[float, ...]
    edges: tuple[int, ...]
    shares: tuple[float, ...]
    metrics: torch.Tensor  # [sizes, batch]
    full: torch.Tensor  # [batch]
    empty: torch.Tensor  # [batch]
    absolute: bool

    def faithfulness(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """``f`` per size on the mean over prompts (``rows``: a resample of them)."""
        rows = torch.arange(self.full.numel()) if rows is None else rows
        full, empty = self.full[rows].mean(), self.empty[rows].mean()
        gap = full - empty
        if not torch.isfinite(gap) or gap.abs() < 1e-12 * max(1.0, float(full.abs())):
            raise GradGraphError("the prompts' metric equals the counterfactuals' (m(N) = m(∅)): faithfulness "
                                 "is undefined; use counterfactuals that change the prediction")
        return (self.metrics[:, rows].mean(1) - empty) / gap

    def areas(self, convention: str = "fixed", rows: torch.Tensor | None = None) -> dict[str, float]:
        """``{"CPR": ∫ f, "CMD": ∫ |1 − f|}`` by the trapezoid rule over the ``convention``'s x-axis."""
        if convention not in CONVENTIONS:
            raise GradGraphError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
        f = self.faithfulness(rows)
        x = torch.tensor(self.sizes if convention == "fixed" else self.shares, dtype=f.dtype)
        return {"CPR": float(torch.trapezoid(f, x)), "CMD": float(torch.trapezoid((1 - f).abs(), x))}

    def intervals(self, convention: str = "fixed", *, resamples: int = 1000, level: float = 0.95,
                  seed: int = 0) -> dict[str, tuple[float, float]]:
        """Percentile intervals of CPR and CMD over prompts resampled with replacement."""
        gen = torch.Generator().manual_seed(seed)
        n = self.full.numel()
        draws = [self.areas(convention, torch.randint(n, (n,), generator=gen)) for _ in range(resamples)]
        lo, hi = (1 - level) / 2, 1 - (1 - level) / 2
        out = {}
        for key in ("CPR", "CMD"):
            values = torch.tensor([d[key] for d in draws])
            out[key] = (float(values.quantile(lo)), float(values.quantile(hi)))
        return out


def faithfulness_curve(model: Model, tokens, counterfactual, metric, scores: EdgeScores, *,
                       sizes=SIZES, absolute: bool = True, attention_mask: torch.Tensor | None = None,
                       ablation: str = "counterfactual") -> Curve:
    """``f`` of the top-``int(share · edges)`` circuits by ``scores`` at each of ``sizes`` (see the module)."""
    sizes = tuple(float(s) for s in sizes)
    if not sizes or any(not (0 < s <= 1) or math.isnan(s) for s in sizes) or list(sizes) != sorted(sizes):
        raise GradGraphError(f"sizes must be increasing shares of the edges in (0, 1] (MIB's: {SIZES}), got {sizes}")
    graph = scores.graph
    clean, mask, other = _ablated(model, tokens, counterfactual, metric, attention_mask, ablation, graph.registry)
    run = lambda c: _run(model, clean, mask, metric, c, other)  # noqa: E731
    circuits = [top_edges(scores, int(s * len(graph)), absolute=absolute) for s in sizes]
    metrics = torch.stack([run(c) for c in circuits])
    return Curve(sizes, tuple(len(c) for c in circuits), tuple(c.share for c in circuits), metrics,
                 run(Circuit.full(graph)), run(Circuit.empty(graph)), absolute)


__all__ = ["ABLATIONS", "CONVENTIONS", "SIZES", "Curve", "circuit_metric", "faithfulness_curve"]
