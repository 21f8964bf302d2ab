"""Compiled transformers (tracr) as ``HookedTransformer``s, widened with distractors, and the
compiled circuit they carry: the ground truth that circuit methods are measured against.

``gradgraph/tracr_export.py`` (run in the tracr environment) writes each program's weights; here
they become a norm-free causal ``HookedTransformer`` (float64, ReLU MLPs, tracr's 1/√d_head
attention scale, no biases in use) that reproduces tracr's final residual on every input. A compiled
residual stream is a direct sum of named one-hot and numerical subspaces, so the compiled circuit is
read off the weights: an edge ``u -> d`` is in it when ``u`` writes a residual dimension ``d``
reads (the support of W_E/W_pos, W_O or W_out against that of W_Q, W_K, W_V, W_in or W_U), pruned
as MIB prunes (every node on a path from the embeddings to the logits). Nodes: the components with
an edge of it.

Distractors (Conmy et al. 2023's caution that compiled models are too clean): ``distractor_heads``
extra heads per layer and ``distractor_neurons`` extra MLP neurons read the whole residual stream
with random weights and write random vectors into ``extra_dims`` new residual dimensions that no
compiled component and not the unembedding read. They have activations of their own and exactly no
effect on the output; a layer whose attention or MLP the compiler left empty holds only them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from gradgraph.arch.models import set_flags
from gradgraph.circuits import Circuit, prune
from gradgraph.edges import LOGITS, EdgeGraph, edge_graph
from gradgraph.errors import GradGraphError

PROGRAMS = ("frac_prevs", "prev_token", "two_back", "prev_pair_equal")
PAD = "compiler_pad"


@dataclass(frozen=True)
class Compiled:
    """A compiled program: its model, the compiled circuit, and what the export recorded."""

    name: str
    model: HookedTransformer
    circuit: Circuit  # the compiled circuit on the widened model's edge graph
    meta: dict  # tracr's config, residual labels, encodings, inputs and outputs
    reference: torch.Tensor  # tracr's final residual on every input [inputs, pos, compiled d_model]
    inputs: torch.Tensor  # every input of the longest length, encoded [inputs, pos]

    @property
    def pad(self) -> int:
        """The id of tracr's padding token (a word no program reads: the integrated methods' baseline)."""
        return int(self.meta["encoding"][PAD])


def load_compiled(folder: str | Path, name: str, *, distractor_heads: int = 2, distractor_neurons: int = 8,
                  extra_dims: int = 4, seed: int = 0) -> Compiled:
    """Program ``name`` from ``folder`` (``tracr_export.py``'s output) as a widened ``HookedTransformer``."""
    path = Path(folder)
    if name not in PROGRAMS:
        raise GradGraphError(f"unknown compiled program {name!r}; choose from {PROGRAMS}")
    if not (path / f"{name}.npz").is_file() or not (path / f"{name}.json").is_file():
        raise GradGraphError(f"{path} holds no export of {name}; run `.venv-tracr/bin/python "
                             f"gradgraph/tracr_export.py {path}` (make tracr sets that environment up)")
    if min(distractor_heads, distractor_neurons, extra_dims) < 0 or (distractor_heads or distractor_neurons) and not extra_dims:
        raise GradGraphError("distractors need extra_dims > 0 residual dimensions to write into, and no count can be "
                             "negative")
    meta = json.loads((path / f"{name}.json").read_text())
    w = {k: torch.from_numpy(v) for k, v in np.load(path / f"{name}.npz").items()}
    L, H, dh, D = meta["n_layers"], meta["n_heads"], meta["d_head"], meta["d_model"]
    M = meta["d_mlp"]
    heads, neurons, width = H + distractor_heads, M + distractor_neurons, D + extra_dims
    cfg = HookedTransformerConfig(n_layers=L, d_model=width, d_head=dh, n_heads=heads, d_mlp=neurons,
                                  d_vocab=w["W_E"].shape[0], d_vocab_out=w["W_U"].shape[1], n_ctx=meta["n_ctx"],
                                  act_fn="relu", normalization_type=None, attention_dir="causal",
                                  positional_embedding_type="standard", default_prepend_bos=False,
                                  dtype=torch.float64)  # every weight is set below (no seed: TL's would reseed torch)
    model = HookedTransformer(cfg)
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    state = {k: torch.zeros_like(v) for k, v in model.state_dict().items() if not k.endswith(("IGNORE", "mask"))}
    state["embed.W_E"][:, :D], state["pos_embed.W_pos"][:, :D] = w["W_E"], w["W_pos"]
    state["unembed.W_U"][:D] = w["W_U"]
    for layer in range(L):
        b = f"blocks.{layer}"
        for part, key in (("query", "W_Q"), ("key", "W_K"), ("value", "W_V")):
            state[f"{b}.attn.{key}"][:H, :D] = w[f"{layer}.{part}.w"].reshape(D, H, dh).permute(1, 0, 2)
            state[f"{b}.attn.b_{key[-1]}"][:H] = w[f"{layer}.{part}.b"].reshape(H, dh)
            state[f"{b}.attn.{key}"][H:] = rand(distractor_heads, width, dh) / width ** 0.5
        state[f"{b}.attn.W_O"][:H, :, :D] = w[f"{layer}.linear.w"].reshape(H, dh, D)
        state[f"{b}.attn.b_O"][:D] = w[f"{layer}.linear.b"]
        state[f"{b}.attn.W_O"][H:, :, D:] = rand(distractor_heads, dh, extra_dims) / dh ** 0.5
        state[f"{b}.mlp.W_in"][:D, :M], state[f"{b}.mlp.b_in"][:M] = w[f"{layer}.linear_1.w"], w[f"{layer}.linear_1.b"]
        state[f"{b}.mlp.W_out"][:M, :D], state[f"{b}.mlp.b_out"][:D] = w[f"{layer}.linear_2.w"], w[f"{layer}.linear_2.b"]
        state[f"{b}.mlp.W_in"][:, M:] = rand(width, distractor_neurons) / width ** 0.5
        state[f"{b}.mlp.b_in"][M:] = 0.1 * rand(distractor_neurons)
        state[f"{b}.mlp.W_out"][M:, D:] = rand(distractor_neurons, extra_dims) / distractor_neurons ** 0.5
    model.load_state_dict(state, strict=False)
    set_flags(model)
    model.eval()
    model.requires_grad_(False)
    inputs = torch.tensor([[meta["encoding"][t] for t in item] for item in meta["inputs"]])
    graph = edge_graph(model)
    return Compiled(name, model, compiled_circuit(graph, w, meta), meta, w["final_residual"], inputs)


def _support(matrix: torch.Tensor, dim: int) -> torch.Tensor:
    """``[d_model]`` bool: the residual dimensions ``matrix`` reads (``dim`` = its residual axis) or writes."""
    other = [d for d in range(matrix.ndim) if d != dim]
    return matrix.abs().amax(dim=other) > 0 if other else matrix != 0


def compiled_circuit(graph: EdgeGraph, w: dict[str, torch.Tensor], meta: dict) -> Circuit:
    """The compiled circuit (see the module) on ``graph``, from the compiled weights ``w`` alone."""
    H, dh, D = meta["n_heads"], meta["d_head"], meta["d_model"]
    reg = graph.registry
    writes, reads = {"embed": _support(w["W_E"], 1) | _support(w["W_pos"], 1)}, {LOGITS: _support(w["W_U"], 0)}
    for layer in range(meta["n_layers"]):
        out = w[f"{layer}.linear.w"].reshape(H, dh, D)
        value = w[f"{layer}.value.w"].reshape(D, H, dh)
        for h in range(H):
            used = bool(value[:, h].abs().amax() > 0)  # a head the compiler left empty writes nothing
            writes[f"L{layer}H{h}"] = _support(out[h], 1) & used
            for part, kind in (("query", "q"), ("key", "k"), ("value", "v")):
                reads[f"L{layer}H{h}.{kind}"] = _support(w[f"{layer}.{part}.w"].reshape(D, H, dh)[:, h], 0)
        if reg.mlps:
            writes[f"MLP{layer}"] = _support(w[f"{layer}.linear_2.w"], 1)
            reads[f"MLP{layer}"] = _support(w[f"{layer}.linear_1.w"], 0)
    none = torch.zeros(D, dtype=torch.bool)
    edges = torch.zeros_like(graph.adjacency)
    for u, d in graph.adjacency.nonzero().tolist():
        up, down = graph.upstream[u], graph.downstream[d]
        edges[u, d] = bool((writes.get(up, none) & reads.get(down, none)).any())
    return prune(Circuit(graph, edges))


__all__ = ["Compiled", "PAD", "PROGRAMS", "compiled_circuit", "load_compiled"]
