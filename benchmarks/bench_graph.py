"""Time and memory of build_graph + backprop against the plain torch forward + backward, by prompt length.

SmolLM2-135M (embedded). Prompts: English text (SVA sentences joined) cut to 64, 128, 512 and 1,024
tokens at batch 1, and 8 SVA prompts of about 12 tokens. Baselines, measured in the same run:

- ``torch``: one forward + backward with frozen weights and the gradient at the input embeddings
  only, the least a user could run;
- ``torch+hooks``: the same, keeping the gradient at every hook point (what ``backprop(Real)``
  returns).

Rows: ``Real`` (build + backprop keeping every node), ``Real→inputs`` (keeping only the input
nodes, ``keep=graph.sources``), ``Max``, ``Entropy`` (each keeping the inputs), ``AttnLRP`` and
``Chefer`` (``gradgraph.attribution.lrp`` with ``ATTN_LRP`` / ``CHEFER2021``: build, backprop and
the relevance at every node, as a user calls it). Every job runs in a
fresh process. Its memory is the peak above the process's memory once the model is loaded (RSS on
the CPU, after handing freed memory back with ``malloc_trim``; allocated memory on CUDA), over a
warm-up and one run of the job alone. Its time is the
median of ``--repeats`` runs, and the ratios compare it with both baselines timed in the same
process, alternating with it: a machine that slows down for a while slows both sides of a ratio.

    .venv/bin/python benchmarks/bench_graph.py [--lengths 8x12 64 128 512 1024] [--repeats 3] [--jobs ...]

``--families pythia gemma2 ...`` measures random-weight models of those families instead
(``gradgraph.arch.models.tiny_model`` at ``FAMILY_SHAPE``, random tokens; a length ``BxN`` is a batch of
B prompts of N tokens): what each family's own ops cost beside the GPT-2 and Llama layouts.

Every process keeps freed memory for reuse (``gradgraph.allocator``), as the ``gradgraph`` command
does; ``--default-malloc`` leaves glibc's malloc as it is.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import multiprocessing
import os
import statistics
import threading
import time

import torch

JOBS = ("torch", "torch+hooks", "Real", "Real→inputs", "Max", "Entropy", "AttnLRP", "Chefer")
DEFAULT_JOBS = JOBS[:-1]
TARGETS = {("Real", "128"): 1.5, ("Real", "512"): 1.5, ("Real", "8x12"): 1.5, ("Max", "128"): 2.5,
           ("Max", "512"): 2.5, ("Entropy", "128"): 3.0, ("Entropy", "512"): 3.0, ("AttnLRP", "8x12"): 1.5}


class PeakMemory:
    """Peak resident memory (CPU, sampled from /proc) or peak CUDA allocation during a block."""

    def __init__(self, device: str):
        self.device, self.peak, self._stop = device, 0, threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.01)

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.peak = self.rss()
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
            self.peak = max(self.peak, self.rss())


def prompts(model, length: str):
    """``(tokens, mask, good, bad)`` for a length label: ``"8x12"`` or a number of tokens; ``good``
    and ``bad`` ``[batch]`` are the ids of the metric logit(good) − logit(bad) at each last token."""
    from gradgraph.data import sva_items
    from gradgraph.prompts import single_token_id, to_tokens

    items = sva_items(model.tokenizer)
    if "x" in length:
        batch = int(length.split("x")[0])
        candidates = [i for i in items if 11 <= i.n_tokens <= 13]
        chosen = candidates[:: max(1, len(candidates) // batch)][:batch]
        tokens, mask = to_tokens(model, [i.prefix for i in chosen])
        return tokens, mask, torch.tensor([i.good_id for i in chosen]), torch.tensor([i.bad_id for i in chosen])
    n = int(length)
    text = ". ".join(i.prefix + i.good for i in items[:: 7 if n <= 1024 else 1])  # every item: 7,441 tokens
    tokens, _ = to_tokens(model, text)
    tokens = tokens.repeat(1, -(-n // tokens.shape[1]))[:, :n]  # past its 7,441 tokens, the text again
    good, bad = (torch.tensor([single_token_id(model.tokenizer, w)]) for w in (" are", " is"))
    return tokens, torch.ones_like(tokens), good, bad


# a model of about GPT-2 small's width, 6 layers: big enough that the matrices dominate, as they do in real models
FAMILY_SHAPE = dict(n_layers=6, d_model=512, n_heads=8, d_head=64, d_mlp=2048, d_vocab=8192, n_ctx=1024)


def family_model(family: str, length: str, device: str):
    """A random model of ``family``, and random tokens: ``(model, tokens, mask, metric)``."""
    from gradgraph.arch.models import FAMILIES, tiny_model
    from gradgraph.metrics import logit_diff, mask_positions

    model = tiny_model(family, seed=0, **FAMILY_SHAPE).to(device)
    batch, n = (int(x) for x in length.split("x")) if "x" in length else (1, int(length))
    tokens = torch.randint(3, FAMILY_SHAPE["d_vocab"], (batch, n), generator=torch.Generator().manual_seed(1)).to(device)
    if FAMILIES[family].get("encoder"):  # a masked-LM metric at the middle token
        tokens[:, n // 2] = 2
        return model, tokens, torch.ones_like(tokens), logit_diff(0, 1, pos=mask_positions(model, tokens, 2))
    return model, tokens, torch.ones_like(tokens), logit_diff(0, 1)


def measure(job: str, length: str, device: str, repeats: int, keep_memory: bool = True,
            family: str | None = None) -> dict:
    """Time and memory of one job in this (fresh) process, with both baselines timed beside it."""
    from gradgraph import load_model
    from gradgraph.allocator import hand_back, keep_freed_memory
    from gradgraph.arch import hooks, names
    from gradgraph.attribution import lrp
    from gradgraph.backprop import backprop
    from gradgraph.build import build_graph
    from gradgraph.metrics import logit_diff, prepare
    from gradgraph.semirings import Entropy, Max, Real

    if device == "cpu":
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    if keep_memory:  # as the gradgraph command runs (both sides of every ratio share the process)
        keep_freed_memory()
    with contextlib.redirect_stdout(io.StringIO()):  # TransformerLens announces the device
        if family is None:
            model = load_model("smollm2-135m", device=device)
            tokens, mask, good, bad = prompts(model, length)
            metric = logit_diff(good, bad)
        else:
            model, tokens, mask, metric = family_model(family, length, device)
    model.requires_grad_(False)  # gradients at activations only, as the graph computes them
    metric = prepare(metric, model)
    encoder_mask = dict(one_zero_attention_mask=mask) if names.is_encoder(model.cfg) else {}

    def baseline(everywhere: bool):
        def run():
            with hooks.recording(model, keep_grad=True, names=None if everywhere else {names.inputs(model)[0]}):
                logits = model(tokens, **encoder_mask)
            metric(logits, mask).sum().backward()

        return run

    def graph_job(semiring, everything: bool):
        def run():
            graph = build_graph(model, tokens, metric, attention_mask=mask)
            backprop(graph, semiring, keep=None if everything else graph.sources)

        return run

    def lrp_job(rules: str):
        return lambda: lrp(model, tokens, metric, rules=rules, attention_mask=mask)

    jobs = {"torch": baseline(False), "torch+hooks": baseline(True), "Real": graph_job(Real, True),
            "Real→inputs": graph_job(Real, False), "Max": graph_job(Max, False), "Entropy": graph_job(Entropy, False),
            "AttnLRP": lrp_job("attn-lrp"), "Chefer": lrp_job("chefer2021")}

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    sync()
    if device == "cpu":  # hand memory freed while loading back to the system, so that RSS counts the job
        hand_back()
    base = torch.cuda.memory_allocated() if device == "cuda" else PeakMemory.rss()
    peak = 0
    for _ in range(2):  # a warm-up (numba compilation, weight caches) and one run, the job alone
        with PeakMemory(device) as memory:
            jobs[job]()
            sync()
        peak = max(peak, memory.peak)
    timed = [job] + [b for b in ("torch", "torch+hooks") if b != job]
    for name in timed[1:]:
        jobs[name]()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in timed}
    for i in range(repeats):
        for name in timed[i % len(timed):] + timed[: i % len(timed)]:  # rotate the order
            start = time.perf_counter()
            jobs[name]()
            sync()
            times[name].append(time.perf_counter() - start)
    return dict(seconds={k: statistics.median(v) for k, v in times.items()}, memory=peak - base)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", nargs="+", default=["8x12", "64", "128", "512", "1024"])
    parser.add_argument("--jobs", nargs="+", default=list(DEFAULT_JOBS), choices=JOBS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--families", nargs="+", default=[None],
                        help="random models of these families (gradgraph.arch.models.FAMILIES) instead of SmolLM2")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc's malloc as it is (the gradgraph command keeps freed memory)")
    args = parser.parse_args()
    threads = min(2, os.cpu_count() or 1) if args.device == "cpu" else "-"
    print(f"device {args.device}, torch threads {threads}, median of {args.repeats} runs after a warm-up, "
          f"each job in a fresh process; memory = peak above the loaded model")
    pool = multiprocessing.get_context("spawn")
    ratios: dict[tuple[str, str], float] = {}
    print(f"{'model':<10} {'tokens':>7} {'job':<12} {'time (s)':>9} {'x torch':>8} {'x t+hooks':>10} {'target':>7} "
          f"{'peak MB':>9} {'x torch':>8} {'x t+hooks':>10}")
    for family, length in ((f, n) for f in args.families for n in args.lengths):
        memory: dict[str, int] = {}
        for job in args.jobs:
            worker = pool.Pool(1)
            result = worker.apply(measure, (job, length, args.device, args.repeats, not args.default_malloc, family))
            worker.close()
            worker.join()  # the worker's memory is back before the next job checks what is available
            seconds = result["seconds"]
            memory[job] = result["memory"]
            t, th = seconds[job] / seconds["torch"], seconds[job] / seconds["torch+hooks"]
            ratios[(job, length)] = t
            target = TARGETS.get((job, length))
            m, mh = memory.get("torch"), memory.get("torch+hooks")
            print(f"{family or 'smollm2':<10} {length:>7} {job:<12} {seconds[job]:>9.3f} {t:>8.2f} {th:>10.2f} "
                  f"{('<= %.1fx' % target) if target else '':>7} {memory[job] / 2**20:>9.0f} "
                  f"{(memory[job] / m if m else float('nan')):>8.2f} {(memory[job] / mh if mh else float('nan')):>10.2f}",
                  flush=True)
    numbers = [n for n in args.lengths if n.isdigit()]
    if len(numbers) >= 2 and len(args.families) == 1:
        lo, hi = numbers[0], numbers[-1]
        print(f"\ngrowth of the time ratio to torch from {lo} to {hi} tokens (target for 64 → 512: within 1.3x):")
        for job in args.jobs:
            if not job.startswith("torch") and (job, lo) in ratios and (job, hi) in ratios:
                growth = {n: ratios[(job, n)] / ratios[(job, lo)] for n in numbers if (job, n) in ratios}
                print(f"  {job:<12} " + "  ".join(f"{n}: {g:.2f}" for n, g in growth.items()))


if __name__ == "__main__":
    main()
