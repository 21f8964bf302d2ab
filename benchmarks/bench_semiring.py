"""Speed and memory of graph build + semiring backprop against torch's forward+backward.

SmolLM2-135M (embedded), a batch of 8 SVA prompts of about 12 tokens. Prints, from one run:
torch's forward+backward time and peak memory (weights frozen; gradients retained at every hook point, as Real computes them),
then for each semiring the time of build_graph + backprop and its peak memory, as ratios.

    .venv/bin/python benchmarks/bench_semiring.py [--repeats 3] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import time

import torch
from bench_graph import PeakMemory

from gradgraph import load_model
from gradgraph.arch import hooks
from gradgraph.backprop import backprop
from gradgraph.build import build_graph
from gradgraph.data import sva_items
from gradgraph.metrics import logit_diff
from gradgraph.prompts import to_tokens
from gradgraph.semirings import Abs, Entropy, KMax, Log, Max, Real, SignedMax

TARGETS = {"Real": 2, "Abs": 2, "Log": None, "Entropy": 4, "Max": 8, "SignedMax": None, "KMax(5)": 30}


def timed(fn, repeats: int, device: str) -> tuple[float, int]:
    fn()  # warm-up (and numba compilation)
    times, peak = [], 0
    for _ in range(repeats):
        with PeakMemory(device) as memory:
            start = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        peak = max(peak, memory.peak)
    return statistics.median(times), peak


SEMIRINGS = {sr.name: sr for sr in (Real, Abs, Log, Entropy, Max, SignedMax, KMax(5))}


def setup(device: str, batch: int):
    if device == "cpu":
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    model = load_model("smollm2-135m", device=device)
    model.requires_grad_(False)  # gradients at activations only, as the graph computes them
    candidates = [i for i in sva_items(model.tokenizer) if 11 <= i.n_tokens <= 13]
    items = candidates[:: max(1, len(candidates) // batch)][:batch]
    tokens, mask = to_tokens(model, [i.prefix for i in items])
    metric = logit_diff(torch.tensor([i.good_id for i in items]), torch.tensor([i.bad_id for i in items]))
    return model, tokens, mask, metric


def measure(name: str, device: str, batch: int, repeats: int) -> tuple[float, int]:
    """Time and peak memory of one job, in a fresh process (so earlier jobs leave no high-water mark)."""
    model, tokens, mask, metric = setup(device, batch)
    if name == "torch":

        def run():
            with hooks.recording(model, keep_grad=True):
                logits = model(tokens)
            metric(logits, mask).sum().backward()

    else:
        sr = SEMIRINGS[name]
        # Σ Π |w| over all paths of 30 layers passes float32's range (~e^88): Abs runs in float64
        dtype = torch.float64 if sr is Abs else None

        def run():
            backprop(build_graph(model, tokens, metric, attention_mask=mask), sr, dtype=dtype)

    return timed(run, repeats, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--only", nargs="*", help="semiring names to run (default: all)")
    args = parser.parse_args()
    _, tokens, mask, _ = setup(args.device, args.batch)
    print(f"device {args.device}, threads {torch.get_num_threads()}, batch {tokens.shape[0]} x {tokens.shape[1]} tokens "
          f"({int(mask.sum())} real); each row measured in a fresh process, median of {args.repeats}")
    pool = multiprocessing.get_context("spawn")
    names = ["torch"] + [n for n in SEMIRINGS if not args.only or n in args.only]
    base_time = base_mem = None
    print(f"\n{'':<12} {'time (s)':>9} {'x torch':>8} {'target':>7} {'peak MB':>9} {'x torch':>8}")
    for name in names:
        with pool.Pool(1) as worker:
            seconds, memory = worker.apply(measure, (name, args.device, args.batch, args.repeats))
        if name == "torch":
            base_time, base_mem = seconds, memory
        target = TARGETS.get(name)
        label = name + (" (f64)" if name == "Abs" else "")
        print(f"{label:<12} {seconds:>9.3f} {seconds / base_time:>8.2f} {('<= %dx' % target) if target else '':>7} "
              f"{memory / 2**20:>9.0f} {memory / base_mem:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
