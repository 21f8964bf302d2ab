"""gradgraph against the fastest way a user would otherwise get the same numbers, on the same weights.

SmolLM2-135M (embedded), the prompts of ``bench_graph.py`` (8 SVA prompts of about 12 tokens, and
English text cut to 12, 128 and 512 tokens at batch 1), the metric logit(good) − logit(bad) at each
prompt's last token. Each job runs in a fresh process: a warm-up, its peak memory over one run (RSS
above the loaded model, as in ``bench_graph.py``), then the median of ``--repeats`` runs.

Peers (Hugging Face's Llama classes, float32, weights frozen, loaded offline from the same file):

- ``HF fwd+bwd``: one forward (its default attention, SDPA) and one backward with the gradient at the
  input embeddings: the floor for anything that needs one backward pass;
- ``lxt AttnLRP`` / ``lxt CP-LRP``: lxt 2.1's reference implementation (its patches, eager attention),
  the relevance as input × modified gradient at the embeddings;
- ``captum LayerIG (32)``: captum's ``LayerIntegratedGradients`` at the input embeddings, 32
  Gauss–Legendre points from the pad-token baseline (BOS kept), 8 rows at a time;
- ``TL fwd+bwd``: TransformerLens 3.9's forward and backward with the gradient at ``hook_embed``
  (the second baseline, named as such);
- ``TL4 attribution_patch``: TransformerLens 4.3's ``attribution_patch`` (node granularity: every
  head's output, MLP output and embedding at every position) on a bridge of the same weights (run
  in a process with ``.venv-tl4`` on its path; one prompt, the counterfactual the same prompt with
  its second token replaced).

gradgraph: ``Real→inputs`` (the gradient at the inputs, ``fused.input_values``), ``Real→inputs
(graph)`` (build_graph + backprop keeping the inputs), ``Max`` and ``Entropy`` (keeping the inputs),
``AttnLRP`` and ``CP-LRP`` (``lrp``: token relevance and its deltas), ``IG (32)``
(``attribute(method="ig")``), ``attribution patching`` (``build_graph`` of the clean prompt, the
gradient at every head's z, MLP output and embedding, ``interventions.attribution_patching`` with
the counterfactual's run, and ``position_attribution`` per position).
Each is divided by HF fwd+bwd and by its own peer (LRP by lxt's rule set, IG by captum).

    .venv/bin/python benchmarks/bench_peers.py [--lengths 8x12 12 128 512] [--repeats 3] [--jobs ...]
    .venv/bin/python benchmarks/bench_peers.py --alternate --repeats 7 --jobs Max   # one process, HF and Max in turn
"""

from __future__ import annotations

import argparse
import contextlib
import io
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bench_graph import PeakMemory, prompts  # noqa: E402

HF_PEERS = ("HF fwd+bwd", "lxt AttnLRP", "lxt CP-LRP", "captum LayerIG (32)")  # on Hugging Face's classes
PEERS = HF_PEERS + ("TL fwd+bwd", "TL4 attribution_patch")
OURS = ("Real→inputs", "Real→inputs (graph)", "Max", "Entropy", "AttnLRP", "CP-LRP", "IG (32)", "attribution patching")
RULES = {"AttnLRP": "attn-lrp", "CP-LRP": "cp-lrp"}
PEER_OF = {"AttnLRP": "lxt AttnLRP", "CP-LRP": "lxt CP-LRP", "IG (32)": "captum LayerIG (32)",
           "attribution patching": "TL4 attribution_patch"}
IG_LENGTHS = ("12", "128")  # one prompt (IG's paths are per prompt); at 512 tokens 32 points take minutes
PATCHING = ("TL4 attribution_patch", "attribution patching")  # one prompt and its counterfactual
TL4 = Path(__file__).resolve().parents[1] / ".venv-tl4"
STEPS = 32


def _inputs(length: str):
    """The benchmark's tokens, mask and per-row (good, bad) ids, from the TransformerLens model's
    tokenizer (the same ids feed every job)."""
    from gradgraph import load_model

    with contextlib.redirect_stdout(io.StringIO()):
        model = load_model("smollm2-135m")
    tokens, mask, good, bad = prompts(model, length)
    return model, tokens, mask, good, bad, model.tokenizer.pad_token_id


def _hf_job(job: str, tokens, mask, good, bad, pad: int):
    import lxt_reference

    rules = {"lxt AttnLRP": "attn-lrp", "lxt CP-LRP": "cp-lrp"}.get(job)
    model, _ = lxt_reference.load(rules, attention="sdpa" if rules is None else "eager")
    last = mask.sum(1) - 1
    rows = torch.arange(len(tokens))

    def metric(logits):  # [rows]: logit(good) − logit(bad) at each prompt's last token
        at = logits[rows, last]
        return at[rows, good] - at[rows, bad]

    embedding = model.get_input_embeddings()
    if job == "captum LayerIG (32)":
        from captum.attr import LayerIntegratedGradients

        baseline = torch.where(torch.arange(tokens.shape[1]) == 0, tokens, torch.full_like(tokens, pad))
        lig = LayerIntegratedGradients(lambda ids, m: metric(model(input_ids=ids, attention_mask=m).logits), embedding)
        return lambda: lig.attribute(tokens, baseline, additional_forward_args=(mask,), n_steps=STEPS,
                                     method="gausslegendre", internal_batch_size=8 * len(tokens))

    def run():  # the plain and the lxt passes: input × gradient at the embeddings
        embeds = embedding(tokens).requires_grad_(True)
        metric(model(inputs_embeds=embeds, attention_mask=mask).logits).sum().backward()
        return (embeds * embeds.grad).sum(-1)

    return run


def _our_job(job: str, model, tokens, mask, good, bad):
    from gradgraph import fused
    from gradgraph.arch import hooks, names
    from gradgraph.attribution import attribute, lrp
    from gradgraph.backprop import backprop
    from gradgraph.build import build_graph
    from gradgraph.metrics import logit_diff, prepare
    from gradgraph.semirings import Entropy, Max, Real

    model.requires_grad_(False)
    metric = logit_diff(good, bad) if len(tokens) > 1 else logit_diff(int(good), int(bad))
    if job == "TL fwd+bwd":
        prepared = prepare(metric, model)

        def tl():
            with hooks.recording(model, keep_grad=True, names={names.inputs(model)[0]}):
                logits = model(tokens)
            prepared(logits, mask).sum().backward()

        return tl
    if job in RULES:
        return lambda: lrp(model, tokens, metric, rules=RULES[job], attention_mask=mask)
    if job == "IG (32)":
        return lambda: attribute(model, tokens, metric, method="ig", steps=STEPS)  # one prompt: no padding
    if job == "Real→inputs":
        return lambda: fused.input_values(model, tokens, metric, rules="gradient", attention_mask=mask)
    semiring = {"Real→inputs (graph)": Real, "Max": Max, "Entropy": Entropy}[job]

    def graph():
        built = build_graph(model, tokens, metric, attention_mask=mask)
        backprop(built, semiring, keep=built.sources)

    return graph


def _counterfactual(tokens: torch.Tensor) -> torch.Tensor:
    """The prompt with its second token replaced (the same length, as attribution patching needs)."""
    other = tokens.clone()
    other[:, 1] = (tokens[:, 1] + 1) % 1000 + 100
    return other


def _patching_job(job: str, model, tokens, good, bad):
    from gradgraph.metrics import logit_diff

    corrupt = _counterfactual(tokens)
    if job == "TL4 attribution_patch":
        from transformer_lens.tools.analysis.attribution_patching import attribution_patch

        model.eval()
        g, b = int(good), int(bad)
        return lambda: attribution_patch(model, tokens, corrupt, lambda logits: logits[0, -1, g] - logits[0, -1, b])
    from gradgraph.arch import names
    from gradgraph.backprop import backprop
    from gradgraph.build import build_graph
    from gradgraph.interventions import SITES, attribution_patching, position_attribution, _cache

    metric = logit_diff(int(good), int(bad))
    L = model.cfg.n_layers
    wanted = [names.name(kind, layer) for layer in range(L) for kind in ("z", "mlp_out")] + [names.name("embed")]
    wanted += [names.name(site, layer) for layer in range(L) for site in SITES]

    def run():
        graph = build_graph(model, tokens, metric)
        grads = {n: v[0] for n, v in backprop(graph, keep=sorted(set(wanted))).items()}
        other = _cache(model, corrupt)
        per_component = attribution_patching(model, tokens, corrupt, grads, clean=graph.activations, corrupt=other)
        return per_component, position_attribution(graph.activations, other, grads, L)

    return run


def _worker_inputs(length: str):
    """A fresh worker's set-up: two threads, the allocator the gradgraph command runs with (the
    peers get the same), and the benchmark's inputs."""
    from gradgraph.allocator import keep_freed_memory

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    keep_freed_memory()
    return _inputs(length)


def measure(job: str, length: str, repeats: int) -> dict:
    """Time and memory of one job in this (fresh) process."""
    from gradgraph.allocator import hand_back

    model, tokens, mask, good, bad, pad = _worker_inputs(length)
    if job in HF_PEERS:
        del model  # only its tokens were needed
        run = _hf_job(job, tokens, mask, good, bad, pad)
    elif job in PATCHING:  # TransformerLens 4.3's needs the weights to require grad (its gradients start there)
        model.requires_grad_(job == "TL4 attribution_patch")
        run = _patching_job(job, model, tokens, good, bad)
    else:
        run = _our_job(job, model, tokens, mask, good, bad)
    if repeats == 0:  # --once: one run, timed and measured (a long prompt's), numba's kernels cached on disk
        base = PeakMemory.rss()
        with PeakMemory("cpu") as memory:
            start = time.perf_counter()
            run()
            seconds = time.perf_counter() - start
        return dict(seconds=seconds, memory=memory.peak - base)
    run()  # warm-up: numba compilation, weight caches
    hand_back()
    base = PeakMemory.rss()
    with PeakMemory("cpu") as memory:
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return dict(seconds=statistics.median(times), memory=memory.peak - base)


def alternated(job: str, length: str, repeats: int) -> dict:
    """HF fwd+bwd and ``job`` in this one (fresh) process, timed in turn ``repeats`` times after a
    warm-up of each: the median of the per-pair ratios, so that a drift of the machine's speed
    during the run moves both sides (the fresh-process medians move by about ±0.15 between runs)."""
    model, tokens, mask, good, bad, pad = _worker_inputs(length)
    runs = {"HF fwd+bwd": _hf_job("HF fwd+bwd", tokens, mask, good, bad, pad),
            job: _our_job(job, model, tokens, mask, good, bad)}
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    ratios = [ours / hf for ours, hf in zip(times[job], times["HF fwd+bwd"])]
    return dict(hf=statistics.median(times["HF fwd+bwd"]), seconds=statistics.median(times[job]),
                ratio=statistics.median(ratios), low=min(ratios), high=max(ratios))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", nargs="+", default=["8x12", "12", "128", "512"])
    parser.add_argument("--jobs", nargs="+", default=list(PEERS + OURS), choices=PEERS + OURS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--once", action="store_true",
                        help="one run per job, timed and measured, no warm-up (for 4,096 tokens and more)")
    parser.add_argument("--alternate", action="store_true",
                        help="each of gradgraph's jobs alternated with HF fwd+bwd in one process: the median ratio of the pairs")
    args = parser.parse_args()
    if args.alternate:
        return _alternate(args)
    if args.once:
        args.repeats = 0
    runs = "one run, no warm-up" if args.once else f"median of {args.repeats} runs after a warm-up"
    print(f"CPU, torch threads {min(2, os.cpu_count() or 1)}, {runs}, "
          f"each job in a fresh process; memory = peak RSS above the loaded model")
    print(f"| tokens | job | time (s) | x HF fwd+bwd | x its peer | peak MB | memory x HF |\n|---|---|---|---|---|---|---|")
    pool = multiprocessing.get_context("spawn")
    for length in args.lengths:
        done: dict[str, dict] = {}
        for job in args.jobs:
            if "IG" in job and length not in IG_LENGTHS or job in PATCHING and "x" in length:
                continue
            path = os.environ.get("PYTHONPATH")
            if job.startswith("TL4"):  # the worker starts with TransformerLens 4.3 first on its path
                os.environ["PYTHONPATH"] = str(TL4) + (os.pathsep + path if path else "")
            try:
                with pool.Pool(1) as worker:
                    done[job] = worker.apply(measure, (job, length, args.repeats))
            finally:
                os.environ.pop("PYTHONPATH", None) if path is None else os.environ.__setitem__("PYTHONPATH", path)
            seconds, memory = done[job]["seconds"], done[job]["memory"]
            hf, peer = done.get("HF fwd+bwd"), done.get(PEER_OF.get(job, ""))
            print(f"| {length} | {job} | {seconds:.3f} | {_ratio(seconds, hf, 'seconds')} | "
                  f"{_ratio(seconds, peer, 'seconds')} | {memory / 2**20:.0f} | {_ratio(memory, hf, 'memory')} |",
                  flush=True)


def _alternate(args) -> None:
    print(f"CPU, torch threads {min(2, os.cpu_count() or 1)}; HF fwd+bwd and each job alternated {args.repeats} "
          f"times in one fresh process after a warm-up of each")
    print("| tokens | job | HF fwd+bwd (s) | job (s) | median ratio of the pairs | lowest, highest |\n|---|---|---|---|---|---|")
    pool = multiprocessing.get_context("spawn")
    for length in args.lengths:
        for job in (j for j in args.jobs if j in OURS and j not in PATCHING and "IG" not in j):
            with pool.Pool(1) as worker:
                got = worker.apply(alternated, (job, length, args.repeats))
            print(f"| {length} | {job} | {got['hf']:.3f} | {got['seconds']:.3f} | {got['ratio']:.2f} | "
                  f"{got['low']:.2f}, {got['high']:.2f} |", flush=True)


def _ratio(value: float, of: dict | None, key: str) -> str:
    return f"{value / of[key]:.2f}" if of and of[key] else ""


if __name__ == "__main__":
    main()
