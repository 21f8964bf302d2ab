"""Circuits on the embedded model: the edge methods' speed against a plain Hugging Face forward +
backward on the same weights, and IOI's faithfulness sweep with CPR and CMD per method.

    .venv/bin/python benchmarks/bench_circuits.py [--speed-prompts 8] [--items 100] [--steps 5]
        [--methods eap eap-ig relp attn-lrp flow max random] [--resamples 1000] [--tasks ioi sva copying]
        [--skip-speed] [--skip-sweep]

Speed: each edge method on ``--speed-prompts`` IOI prompts against HF's forward + backward on them
(``bench_peers``' job; medians of 3 after a warm-up, one process). Sweep: ``gradgraph circuit``'s
run (``gradgraph.studies.circuit``) on ``--items`` prompts of each task the model gets right: MIB's ten
sizes, CPR from the signed selection and CMD from the absolute one, on the fixed x-axis (MIB's
leaderboard) and the circuits' own edge shares (its paper), 95 % bootstrap intervals over prompts;
``random``: uniform random scores, the floor.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def _median(fn, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def speed(n: int, methods, steps: int) -> None:
    from bench_peers import _hf_job

    from gradgraph import load_model
    from gradgraph.edge_methods import edge_scores
    from gradgraph.metrics import logit_diff
    from gradgraph.studies import circuit

    with contextlib.redirect_stdout(io.StringIO()):
        model = load_model("smollm2-135m")
    model.requires_grad_(False)
    tokens, mask, other, good, bad, _ = circuit._task(model, circuit.Config(items=n))
    metric = logit_diff(good, bad)
    hf = _median(_hf_job("HF fwd+bwd", tokens, mask, good, bad, 0))
    print(f"speed, {len(tokens)} IOI prompts x {tokens.shape[1]} tokens; HF fwd+bwd {hf:.3f} s")
    print("| method | s | x HF |\n|---|---|---|")
    for method in [m for m in methods if m != "random"]:
        t = _median(lambda: edge_scores(model, tokens, metric, other, method=method, steps=steps, attention_mask=mask))
        print(f"| {method}{f' ({steps})' if method == 'eap-ig' else ''} | {t:.3f} | {t / hf:.2f}x |", flush=True)


def sweep(task: str, items: int, methods, steps: int, resamples: int) -> None:
    from gradgraph.studies import circuit

    result = circuit.run(circuit.Config(task=task, items=items, methods=tuple(methods), steps=steps,
                                        resamples=resamples))
    rows = {(r["method"], r["x_axis"]): r for r in circuit._rows(result)}
    print(f"\nsweep: {result['task']}, MIB's sizes")
    print("| method | CPR fixed x | CMD fixed x | CPR own x | CMD own x | f at 0.1 %, 1 %, 10 % | sweep s |")
    print("|---|---|---|---|---|---|---|")
    for method, curve in result["absolute"].items():
        cells = [f"{r[k]:.3f} [{r[k + '_low']:.3f}, {r[k + '_high']:.3f}]" for x in circuit.CONVENTIONS
                 for r in [rows[(method, x)]] for k in ("CPR", "CMD")]
        f = curve.faithfulness()
        picks = ", ".join(f"{float(f[curve.sizes.index(s)]):.2f}" for s in (0.001, 0.01, 0.1))
        print(f"| {method} | " + " | ".join(cells) + f" | {picks} | {result['seconds'][method]:.0f} |")


def main() -> None:
    from gradgraph.studies.circuit import ALL

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speed-prompts", type=int, default=8)
    parser.add_argument("--items", type=int, default=100)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--methods", nargs="+", default=list(ALL))
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--tasks", nargs="+", default=["ioi"], help="the sweeps' tasks: ioi, sva, copying")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-sweep", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    if not args.skip_speed:
        speed(args.speed_prompts, args.methods, args.steps)
    for task in [] if args.skip_sweep else args.tasks:
        sweep(task, args.items, args.methods, args.steps, args.resamples)


if __name__ == "__main__":
    main()
