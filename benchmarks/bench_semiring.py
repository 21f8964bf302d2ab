"""Speed and memory of graph build + semiring backprop against torch's forward+backward.

SmolLM2-135M (embedded), a batch of 8 SVA prompts of about 12 tokens. Prints, from one run:
torch's forward+backward time and peak memory (weights frozen; gradients retained at every hook point, as Real computes them),
then for each semiring the time of build_graph + backprop and its peak memory, as ratios.

    .venv/bin/python benchmarks/bench_semiring.py [--repeats 3] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

import torch

from gradgraph import hooks, load_model
from gradgraph.backprop import backprop
from gradgraph.build import build_graph
from gradgraph.data import sva_items
from gradgraph.metrics import logit_diff
from gradgraph.prompts import to_tokens
from gradgraph.semirings import Abs, Entropy, KMax, Log, Max, Real, SignedMax

TARGETS = {"Real": 2, "Abs": 2, "Log": None, "Entropy": 4, "Max": 8, "SignedMax": None, "KMax(5)": 30}


class PeakMemory:
    """Peak resident memory (CPU, sampled from /proc) or peak CUDA allocation during a block."""

    def __init__(self, device: str):
        self.device, self.peak, self._stop = device, 0, threading.Event()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.02)

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.start = self._rss()
            self.peak = self.start
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss())

    @property
    def used(self) -> int:
        return self.peak - self.start if self.device == "cuda" else self.peak


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
        peak = max(peak, memory.used)
    return statistics.median(times), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--only", nargs="*", help="semiring names to run (default: all)")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    model = load_model("smollm2-135m", device=args.device)
    candidates = [i for i in sva_items(model.tokenizer) if 11 <= i.n_tokens <= 13]
    items = candidates[:: max(1, len(candidates) // args.batch)][: args.batch]
    tokens, mask = to_tokens(model, [i.prefix for i in items])
    metric = logit_diff(torch.tensor([i.good_id for i in items]), torch.tensor([i.bad_id for i in items]))
    print(f"device {args.device}, threads {torch.get_num_threads()}, batch {tokens.shape[0]} x {tokens.shape[1]} tokens "
          f"({int(mask.sum())} real)")

    model.requires_grad_(False)  # gradients at activations only, as the graph computes them

    def torch_reference():
        with hooks.recording(model, keep_grad=True):
            logits = model(tokens)
        metric(logits, mask).sum().backward()

    base_time, base_mem = timed(torch_reference, args.repeats, args.device)
    print(f"\n{'':<12} {'time (s)':>9} {'x torch':>8} {'target':>7} {'peak MB':>9} {'x torch':>8}")
    print(f"{'torch':<12} {base_time:>9.3f} {1:>8.2f} {'':>7} {base_mem / 2**20:>9.0f} {1:>8.2f}")
    semirings = [Real, Abs, Log, Entropy, Max, SignedMax, KMax(5)]
    for sr in semirings:
        if args.only and sr.name not in args.only:
            continue
        # Σ Π |w| over all paths of 30 layers passes float32's range (~e^88): Abs runs in float64
        dtype = torch.float64 if sr is Abs else None
        run = lambda: backprop(build_graph(model, tokens, metric, attention_mask=mask), sr, dtype=dtype)  # noqa: E731
        seconds, memory = timed(run, args.repeats, args.device)
        target = TARGETS.get(sr.name)
        label = sr.name + (" (f64)" if dtype else "")
        print(f"{label:<12} {seconds:>9.3f} {seconds / base_time:>8.2f} {('<= %dx' % target) if target else '':>7} "
              f"{memory / 2**20:>9.0f} {memory / base_mem:>8.2f}")


if __name__ == "__main__":
    main()
