"""Circuits on the embedded model: the edge methods' speed against a plain Hugging Face forward +
backward on the same weights, and IOI's faithfulness sweep with CPR and CMD per method.

    .venv/bin/python benchmarks/bench_circuits.py [--speed-prompts 8] [--items 100] [--steps 5]
        [--methods eap eap-ig relp attn-lrp flow max random] [--resamples 1000]

Speed: each edge method on ``--speed-prompts`` IOI prompts against HF's forward + backward on them
(medians of 3 after a warm-up, one process). Sweep: MIB's ten sizes on ``--items`` IOI prompts
(SmolLM2-135M's correct ones, ABC counterfactuals); CPR from the signed selection, CMD from the
absolute one (as MIB scores them), each under the fixed x-axis (MIB's leaderboard) and the
circuits' own edge shares (its paper), with 95 % bootstrap intervals over prompts; ``random``:
uniform random scores, the floor.
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


def _hf(tokens: torch.Tensor, mask: torch.Tensor, good: torch.Tensor, bad: torch.Tensor):
    import lxt_reference

    model, _ = lxt_reference.load(None, attention="sdpa")
    last, rows = mask.sum(1) - 1, torch.arange(len(tokens))

    def run():
        embeds = model.get_input_embeddings()(tokens).requires_grad_(True)
        at = model(inputs_embeds=embeds, attention_mask=mask).logits[rows, last]
        (at[rows, good] - at[rows, bad]).sum().backward()

    return run


def main() -> None:
    from gradgraph import load_model
    from gradgraph.circuit_faithfulness import faithfulness_curve
    from gradgraph.data.ioi import ioi_items
    from gradgraph.edge_methods import METHODS, edge_scores
    from gradgraph.edges import EdgeScores
    from gradgraph.metrics import logit_diff, prepare
    from gradgraph.prompts import to_tokens

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speed-prompts", type=int, default=8)
    parser.add_argument("--items", type=int, default=100)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--methods", nargs="+", default=list(METHODS) + ["random"])
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    with contextlib.redirect_stdout(io.StringIO()):
        model = load_model("smollm2-135m")
    model.requires_grad_(False)

    def task(n: int, seed: int = 0):
        items = ioi_items(model.tokenizer, 2 * n, seed=seed)
        tokens, mask = to_tokens(model, [i.prompt for i in items])
        metric = logit_diff([i.io for i in items], [i.s for i in items])
        with torch.no_grad():
            right = prepare(metric, model)(model(tokens), mask) > 0
        items = [i for i, ok in zip(items, right.tolist()) if ok][:n]
        tokens, mask = to_tokens(model, [i.prompt for i in items])
        other, _ = to_tokens(model, [i.counterfactual for i in items])
        ids = lambda words: torch.tensor([model.tokenizer.encode(w, add_special_tokens=False)[0] for w in words])  # noqa: E731
        return tokens, mask, other, logit_diff(ids([i.io for i in items]), ids([i.s for i in items])), \
            ids([i.io for i in items]), ids([i.s for i in items]), int(right.sum()) / len(right)

    if not args.skip_speed:
        tokens, mask, other, metric, good, bad, _ = task(args.speed_prompts)
        hf = _median(_hf(tokens, mask, good, bad))
        print(f"speed, {len(tokens)} IOI prompts x {tokens.shape[1]} tokens; HF fwd+bwd {hf:.3f} s")
        print("| method | s | x HF |\n|---|---|---|")
        for method in [m for m in args.methods if m != "random"]:
            t = _median(lambda: edge_scores(model, tokens, metric, other, method=method, steps=args.steps,
                                            attention_mask=mask))
            print(f"| {method}{f' ({args.steps})' if method == 'eap-ig' else ''} | {t:.3f} | {t / hf:.2f}x |")

    tokens, mask, other, metric, _, _, accuracy = task(args.items, seed=1)
    print(f"\nIOI sweep: {len(tokens)} prompts (the model is right on {accuracy:.1%} of those drawn), MIB's sizes")
    print("| method | CPR fixed x | CMD fixed x | CPR own x | CMD own x | f at 0.1 %, 1 %, 10 % | sweep s |")
    print("|---|---|---|---|---|---|---|")
    for method in args.methods:
        start = time.perf_counter()
        if method == "random":
            base = edge_scores(model, tokens, metric, other, method="eap", attention_mask=mask)
            gen = torch.Generator().manual_seed(0)
            scores = EdgeScores(base.graph, torch.rand(base.scores.shape[1:], generator=gen, dtype=base.scores.dtype)[None]
                                * base.graph.adjacency, "random")
        else:
            scores = edge_scores(model, tokens, metric, other, method=method, steps=args.steps, attention_mask=mask)
        signed = faithfulness_curve(model, tokens, other, metric, scores, absolute=False, attention_mask=mask)
        absolute = faithfulness_curve(model, tokens, other, metric, scores, absolute=True, attention_mask=mask)
        seconds = time.perf_counter() - start
        cells = []
        for convention in ("fixed", "own"):
            cpr, cmd = signed.areas(convention)["CPR"], absolute.areas(convention)["CMD"]
            lo_p, hi_p = signed.intervals(convention, resamples=args.resamples)["CPR"]
            lo_m, hi_m = absolute.intervals(convention, resamples=args.resamples)["CMD"]
            cells += [f"{cpr:.3f} [{lo_p:.3f}, {hi_p:.3f}]", f"{cmd:.3f} [{lo_m:.3f}, {hi_m:.3f}]"]
        f = absolute.faithfulness()
        picks = ", ".join(f"{float(f[absolute.sizes.index(s)]):.2f}" for s in (0.001, 0.01, 0.1))
        print(f"| {method} | " + " | ".join(cells) + f" | {picks} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
