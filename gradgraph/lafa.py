"""LAFA: locally aggregated feature attribution (Zhang et al., NAACL 2022; REFERENCES.md §6).

A base attribution of the input is smoothed with those of its neighbours: texts of a reference
corpus whose hidden state (``hook_resid_post`` of a middle layer, averaged over the real tokens)
lies nearest to the input's, among those the model assigns the same label (same sign of the
metric). For input token w_t:

    score_t = m_t + λ · (1/|N|) Σ_{i ∈ N} (1/T_i) Σ_k m_{i,k} · K(e(w_t), e(w_{i,k}))

with m the base method's token scores, T_i the neighbour's attributed length and K a kernel on the
token embeddings: ``indicator`` (same token; the paper's SST setting, λ = 0.44), ``cosine``, or
``rbf`` exp(−‖a − b‖₂ / l²), l = 2. With λ = 0 it is the base method. The paper squares its base
gradients; here the base method's own (signed) scores are aggregated, so that λ = 0 returns them.
"""

from __future__ import annotations

import torch

from gradgraph.arch import hooks, names
from gradgraph.errors import GradGraphError
from gradgraph.metrics import prepare
from gradgraph.prompts import to_tokens
from gradgraph.result import Attribution, kept_positions

KERNELS = ("indicator", "cosine", "rbf")


def kernel(name: str, a: torch.Tensor, b: torch.Tensor, ids_a: torch.Tensor, ids_b: torch.Tensor) -> torch.Tensor:
    """``[len(a), len(b)]`` kernel values between token embeddings ``a`` and ``b``."""
    if name == "indicator":
        return (ids_a[:, None] == ids_b[None]).to(a.dtype)
    if name == "cosine":
        return torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(b, dim=-1).T
    if name == "rbf":
        return torch.exp(-torch.cdist(a, b) / 4.0)
    raise GradGraphError(f"unknown kernel {name!r}; choose one of {KERNELS}")


@torch.no_grad()
def _states(model, tokens: torch.Tensor, mask: torch.Tensor, metric, layer: int, batch_size: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean hidden state [n, d_model], metric [n])`` of right-padded rows."""
    name = names.name("resid_post", layer)
    states, values = [], []
    for start in range(0, len(tokens), batch_size):
        t, m = tokens[start:start + batch_size], mask[start:start + batch_size]
        with hooks.recording(model, names={name}) as store:
            logits = model(t, attention_mask=m)
        h = store[name][0]  # [b, pos, d]
        w = m.to(h.dtype)[..., None]
        states.append((h * w).sum(1) / w.sum(1))
        values.append(metric(logits, m))
    return torch.cat(states), torch.cat(values)


def lafa(model, token_ids: torch.Tensor, mask: torch.Tensor, metric, *, corpus, base: str, lam: float,
         kernel: str, n_neighbours: int, layer: int | None, baseline, attribute_bos: bool, positions,
         batch_size: int, attribute):
    """``attribute(..., method="lafa", corpus=[texts], base=..., lam=..., kernel=..., n_neighbours=...,
    layer=...)``: see the module docstring. ``layer`` defaults to a third of the way up; ``positions``
    limit the input's attributed tokens (neighbours are attributed whole). ``attribute`` is
    ``gradgraph.attribution.attribute``, which runs the base method."""
    if corpus is None or len(corpus) == 0:
        raise GradGraphError("LAFA needs a reference corpus: corpus=[texts] of the same task (other prompts "
                             "the model answers with the same metric)")
    if kernel not in KERNELS:
        raise GradGraphError(f"unknown kernel {kernel!r}; choose one of {KERNELS}")
    if base in ("lafa",) or not isinstance(n_neighbours, int) or n_neighbours < 1:
        raise GradGraphError(f"LAFA's base is another method and n_neighbours ≥ 1; got {base!r}, {n_neighbours!r}")
    layer = model.cfg.n_layers // 3 if layer is None else layer
    if not 0 <= layer < model.cfg.n_layers:
        raise GradGraphError(f"layer must be in 0..{model.cfg.n_layers - 1}, got {layer}")
    metric = prepare(metric, model)
    corpus_ids, corpus_mask = to_tokens(model, corpus)
    pool, pool_values = _states(model, corpus_ids, corpus_mask, metric, layer, batch_size)
    states, values = _states(model, token_ids, mask, metric, layer, batch_size)
    W = model.W_E.detach()
    scores = torch.zeros(token_ids.shape, dtype=W.dtype)
    elements = torch.zeros((*token_ids.shape, W.shape[1]), dtype=W.dtype)
    target = torch.zeros(len(token_ids), dtype=W.dtype)
    cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # corpus index -> (ids, scores) of attributed tokens
    for b in range(len(token_ids)):
        n = int(mask[b].sum())
        ids = token_ids[b, :n]
        own = attribute(model, ids[None], metric, method=base, baseline=baseline, attribute_bos=attribute_bos,
                        positions=positions, batch_size=batch_size)
        scores[b, :n], target[b] = own.scores[0], own.target[0]
        elements[b, :n] = own.values[names.inputs(model)[0]][0]
        distance = torch.cdist(states[b][None], pool)[0]
        same = (pool_values > 0) == (values[b] > 0)
        distinct = torch.tensor([int(corpus_mask[i].sum()) != n or not torch.equal(corpus_ids[i, :n], ids)
                                 for i in range(len(pool))])
        allowed = same & distinct
        order = [i for i in torch.argsort(distance).tolist() if allowed[i]][:n_neighbours]
        if not order or lam == 0:
            continue
        spread = torch.zeros(n, dtype=scores.dtype)
        for i in order:
            if i not in cache:
                length = int(corpus_mask[i].sum())
                other = attribute(model, corpus_ids[i:i + 1, :length], metric, method=base, baseline=baseline,
                                  attribute_bos=attribute_bos, batch_size=batch_size)
                attributed = ~kept_positions(model, corpus_ids[i, :length], attribute_bos)
                cache[i] = (corpus_ids[i, :length][attributed], other.scores[0, :length][attributed])
            other_ids, other_scores = cache[i]
            k = _kernel_values(kernel, W, ids, other_ids)  # [n, T_i]
            spread += (k * other_scores[None]).sum(1) / max(len(other_ids), 1)
        scores[b, :n] += lam * spread / len(order) * ~kept_positions(model, ids, attribute_bos, positions)
    name = f"lafa ({own.method}, λ={lam}, {kernel}, {n_neighbours} neighbours)"
    return Attribution(name, token_ids, scores, target, scores.sum(1) - target, {names.inputs(model)[0]: elements})


def _kernel_values(name: str, W: torch.Tensor, ids: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    return kernel(name, W[ids].double(), W[other].double(), ids, other)


__all__ = ["KERNELS", "kernel", "lafa"]
