"""Where a graph pass spends its time: recording, assembly, and each semiring's backprop by block
kind and op (and by layer with ``--by-layer``), beside a plain forward + backward on the same
weights (``inference.differentiable``, what ``fused.input_values`` runs).

    .venv/bin/python benchmarks/profile_graph.py [--lengths 8x12 512] [--semirings Real Max Entropy] [--by-layer]

SmolLM2-135M, the prompts of ``bench_graph.py``; one warm-up, then one timed run of each step.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_graph import prompts  # noqa: E402


@contextlib.contextmanager
def timed_blocks(graph, by_layer: bool):
    """Time every block's ``backward`` while the context is open: ``{(kind, op[, layer]): seconds}``."""
    totals: dict[tuple, float] = collections.defaultdict(float)
    originals = {type(edge): type(edge).backward for edge in graph.edges}

    def wrap(kind, backward):
        def timed(self, semiring, value):
            start = time.perf_counter()
            out = backward(self, semiring, value)
            key = (kind.__name__, self.op) + ((self.layer,) if by_layer else ())
            totals[key] += time.perf_counter() - start
            return out
        return timed

    for kind, backward in originals.items():
        kind.backward = wrap(kind, backward)
    try:
        yield totals
    finally:
        for kind, backward in originals.items():
            kind.backward = backward


def _clock(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    from gradgraph import fused, load_model
    from gradgraph.allocator import keep_freed_memory
    from gradgraph.backprop import backprop
    from gradgraph.build import assemble, record
    from gradgraph.metrics import logit_diff
    from gradgraph import semirings

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", nargs="+", default=["8x12", "512"])
    parser.add_argument("--semirings", nargs="+", default=["Real", "Max", "Entropy"])
    parser.add_argument("--by-layer", action="store_true")
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    keep_freed_memory()
    with contextlib.redirect_stdout(io.StringIO()):
        model = load_model("smollm2-135m")
    model.requires_grad_(False)
    for length in args.lengths:
        tokens, mask, good, bad = prompts(model, length)
        metric = logit_diff(good, bad)
        plain = lambda: fused.input_values(model, tokens, metric, rules="gradient", attention_mask=mask, cuts=False)  # noqa: E731
        plain()
        _, t_plain = _clock(plain)
        record(model, tokens, metric, attention_mask=mask)
        recording, t_record = _clock(lambda: record(model, tokens, metric, attention_mask=mask))
        graph, t_assemble = _clock(lambda: assemble(recording))
        print(f"{length}: forward + backward from the weights {t_plain:.3f} s; record {t_record:.3f} s, "
              f"assemble {t_assemble:.3f} s ({len(graph.edges)} blocks)")
        for name in args.semirings:
            semiring = getattr(semirings, name)
            backprop(graph, semiring, keep=graph.sources)
            with timed_blocks(graph, args.by_layer) as totals:
                _, seconds = _clock(lambda: backprop(graph, semiring, keep=graph.sources))
            top = sorted(totals.items(), key=lambda item: -item[1])[:args.top]
            print(f"  {name} backprop {seconds:.3f} s: " + ", ".join(f"{'/'.join(map(str, k))} {v:.3f}" for k, v in top))


if __name__ == "__main__":
    main()
