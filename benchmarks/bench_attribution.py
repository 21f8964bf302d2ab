"""Per-sentence time of gradgraph's input attributions against captum's LayerIntegratedGradients.

SmolLM2-135M (embedded), one sentence, the quantity logit(" are") − logit(" is") at its last token,
baseline the pad token's embedding at every position after BOS (captum: the pad token's id there).
Measured in one process, each job's median over ``--repeats`` after a warm-up, alternating jobs:

- ``captum IG (n)``: ``LayerIntegratedGradients(model.embed)`` with n Gauss–Legendre steps, all in one
  batch, convergence delta on (it runs the input and the baseline once more, as ours does);
- ``IG (n)``: ``attribute(method="ig", steps=n)`` through the gradient graph;
- ``UDIG (m=30, 32 / 63 points)``: anchor search included (factor 0 / 1);
- ``DIG (m=30, 32 points)``, with the KNN graph read from its cache;
- ``torch fwd+bwd (n rows)``: the plain forward + backward of n rows with the gradient at the input
  embeddings, the least a user could run.

Also: the KNN graph for DIG built (into a temporary cache) and loaded. Ratios are to captum's IG
with the same number of points; |delta| is the completeness error of each.

    .venv/bin/python benchmarks/bench_attribution.py [--repeats 3] [--sentence "..."]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

SENTENCE = "The keys to the old cabinet in the kitchen near the stairs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sentence", default=SENTENCE)
    args = parser.parse_args()

    from captum.attr import LayerIntegratedGradients

    from gradgraph import neighbours
    from gradgraph.arch.models import load_model
    from gradgraph.attribution import attribute
    from gradgraph.metrics import logit_diff

    model = load_model("smollm2-135m")
    metric = logit_diff(" are", " is").resolve(model.tokenizer)
    ids = model.to_tokens(args.sentence)  # [1, pos] with BOS
    pad = model.tokenizer.pad_token_id
    base_ids = torch.where(torch.arange(ids.shape[1]) == 0, ids, torch.full_like(ids, pad))
    print(f"{args.sentence!r}: {ids.shape[1]} tokens (with BOS), {torch.get_num_threads()} threads")

    with tempfile.TemporaryDirectory() as cache:  # the KNN graph built from nothing, then loaded
        old = os.environ.get("XDG_CACHE_HOME")
        os.environ["XDG_CACHE_HOME"] = cache
        start = time.perf_counter()
        neighbours.vocabulary_neighbours(model, progress=False)
        built = time.perf_counter() - start
        start = time.perf_counter()
        neighbours.vocabulary_neighbours(model)
        loaded = time.perf_counter() - start
        if old is None:
            del os.environ["XDG_CACHE_HOME"]
        else:
            os.environ["XDG_CACHE_HOME"] = old
    neighbours.vocabulary_neighbours(model, progress=False)  # the user's cache, for DIG below
    print(f"DIG KNN graph (49,152 × 500): built in {built:.1f} s, loaded in {loaded:.2f} s")

    def captum(n):
        lig = LayerIntegratedGradients(lambda t: metric(model(t)), model.embed)
        _, delta = lig.attribute(ids, base_ids, n_steps=n, method="gausslegendre", return_convergence_delta=True)
        return float(delta)

    def ours(**options):
        return lambda: float(attribute(model, ids, metric, **options).delta)

    def plain(n):
        def run():
            embed = model.W_E.detach()[ids].expand(n, -1, -1).clone().requires_grad_(True)
            from gradgraph.arch import hooks, names
            with hooks.replacing(model, {names.name("embed"): lambda _: embed}):
                metric(model(ids.expand(n, -1))).sum().backward()
            return float("nan")
        return run

    jobs = {
        "captum IG (32)": lambda: captum(32), "IG (32)": ours(method="ig", steps=32),
        "UDIG (m=30, 32 points)": ours(method="udig", steps=30),
        "DIG (m=30, 32 points)": ours(method="dig", steps=30),
        "torch fwd+bwd (32 rows)": plain(32),
        "captum IG (63)": lambda: captum(63), "IG (63)": ours(method="ig", steps=63),
        "UDIG (m=30, 63 points)": ours(method="udig", steps=30, factor=1),
    }
    times = {name: [] for name in jobs}
    deltas = {}
    for name, job in jobs.items():  # warm-up
        deltas[name] = job()
    for _ in range(args.repeats):
        for name, job in jobs.items():
            start = time.perf_counter()
            job()
            times[name].append(time.perf_counter() - start)
    reference = {"32": statistics.median(times["captum IG (32)"]), "63": statistics.median(times["captum IG (63)"])}
    print(f"\n| job | median s | × captum IG (same points) | abs delta |\n|---|---|---|---|")
    for name in jobs:
        median = statistics.median(times[name])
        points = "63" if "63" in name else "32"
        delta = "" if deltas[name] != deltas[name] else f"{abs(deltas[name]):.4f}"
        print(f"| {name} | {median:.2f} | {median / reference[points]:.2f}x | {delta} |")


if __name__ == "__main__":
    main()
