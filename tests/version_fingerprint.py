"""What must not change between TransformerLens versions, computed on the embedded model with the
installed one: ``python tests/version_fingerprint.py OUT.pt`` writes the graph of one SVA prompt
(node names and shapes; each edge block probed as Jᵀv for a fixed random v; Real's values) and the
SVA accuracy. ``tests/test_versions.py`` runs it under the other version and compares."""

from __future__ import annotations

import sys

import torch

from gradgraph import backprop, build_graph, load_model
from gradgraph.arch import lens
from gradgraph.data.sva import sva_items
from gradgraph.evaluate import evaluate_sva
from gradgraph.metrics import logit_diff
from gradgraph.prompts import single_token_id
from gradgraph.semirings import Real

PROMPT = "The keys to the old cabinet"
SVA_ITEMS = 400


def block_probes(graph) -> dict[str, torch.Tensor]:
    """Each edge block's Jᵀ v ``[*src shape]`` for v ~ N(0, 1) of the target's shape, seeded by the
    block's position: equal probes mean equal blocks (with probability one)."""
    probes = {}
    for i, block in enumerate(graph.edges):
        v = torch.randn((1, *graph.shapes[block.tgt]), generator=torch.Generator().manual_seed(i), dtype=torch.float64)
        key = f"{i}:{block.src}->{block.tgt}:{block.op}"
        probes[key] = block.backward(Real, v.to(graph.dtype))[0].double()
    return probes


def fingerprint(model) -> dict:
    good, bad = single_token_id(model.tokenizer, " are"), single_token_id(model.tokenizer, " is")
    graph = build_graph(model, [PROMPT], logit_diff(good, bad))
    values = backprop(graph, Real)
    items = sva_items(model.tokenizer, seed=0, prepend_bos=model.cfg.default_prepend_bos)[:SVA_ITEMS]
    results = evaluate_sva(model, items, progress=False)
    return dict(version=lens.VERSION, shapes=dict(graph.shapes), probes=block_probes(graph),
                values={name: values[name][0].double() for name in graph.shapes},
                accuracy=sum(r["correct"] for r in results) / len(results),
                logit_diffs=torch.tensor([r["logit_diff"] for r in results]))


if __name__ == "__main__":
    torch.save(fingerprint(load_model()), sys.argv[1])
