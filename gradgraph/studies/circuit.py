"""Circuits found and measured (``gradgraph circuit``): every edge method's scores on a task, the
faithfulness sweep of its circuits over MIB's sizes, CPR and CMD under both x-axis conventions
with bootstrap intervals over prompts, random circuits as the floor, and each method's circuit at
one size in EAP-IG's graph JSON.

Config → run → write. The task is IOI (``gradgraph.data.ioi``: ABC counterfactuals), subject–verb
agreement (``gradgraph.data.sva``: the subject's other number), copying (``gradgraph.data.copying``:
the copied word changed in the first copy) — each the items the model gets right — or the user's own
prompts with aligned counterfactuals and a (good, bad) token pair. CPR comes from the signed selection and CMD from the absolute one, as MIB scores them.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from gradgraph import plot, report
from gradgraph.arch.models import load_model
from gradgraph.circuit_export import eap_ig_graph
from gradgraph.circuit_faithfulness import CONVENTIONS, faithfulness_curve
from gradgraph.circuit_tracer import circuit_tracer_circuit
from gradgraph.circuits import layout, top_edges
from gradgraph.data.copying import copying_items
from gradgraph.data.ioi import ioi_items
from gradgraph.data.sva import sva_items
from gradgraph.edge_methods import METHODS, NEEDS_COUNTERFACTUAL, edge_scores
from gradgraph.edges import EdgeScores, edge_graph
from gradgraph.errors import GradGraphError
from gradgraph.metrics import logit_diff, prepare
from gradgraph.prompts import read_prompts, single_token_id, to_tokens
from gradgraph.studies.output import relative_link, staged_run, write_csv
from gradgraph.studies.saved import load

COMMAND = "gradgraph circuit"
# the generated tasks, by the name the tables give them
GENERATED = {"ioi": "IOI", "sva": "subject-verb agreement", "copying": "copying"}
TASKS = (*GENERATED, "prompts")
ALL = METHODS + ("random",)


@dataclass
class Config:
    task: str = "ioi"
    items: int = 32  # items of a generated task the model gets right
    prompts: str | None = None  # --task prompts: a text file, one prompt per line
    counterfactuals: str | None = None  # aligned counterfactual prompts, one per line
    good: str | None = None  # the expected next token
    bad: str | None = None  # the contrasting token
    methods: tuple[str, ...] = ALL
    steps: int = 5  # EAP-IG's points
    size: float = 0.01  # the share of edges of each method's exported circuit
    resamples: int = 1000
    batch_size: int = 16  # prompts scored at a time (the path methods' graphs grow with the batch)
    model: str = "smollm2-135m"
    seed: int = 0
    out: str = "results/circuit"
    figures: str | None = None  # default: OUT/figures


def _drawn(model, task: str, n: int, seed: int) -> list[tuple[str, str, str, str]]:
    """``n`` items of a task as ``(prompt, counterfactual, good, bad)``."""
    if task == "ioi":
        return [(i.prompt, i.counterfactual, i.io, i.s) for i in ioi_items(model.tokenizer, n, seed=seed)]
    if task == "copying":
        return [(i.prompt, i.counterfactual, i.good, i.bad) for i in copying_items(model.tokenizer, n, seed=seed)]
    # SVA: the items whose subject's other number keeps the prompt's tokens aligned, both numbers alike
    items = [i for i in sva_items(model.tokenizer, seed=seed) if i.counterfactual]
    random.Random(seed).shuffle(items)
    return [(i.prefix, i.counterfactual, i.good, i.bad) for i in items[:n]]


def _task(model, config: Config):
    """``(tokens, mask, counterfactual tokens, good ids, bad ids, description)``: the metric is
    ``logit(good) − logit(bad)`` at each prompt's last token; a task's items are those the model gets
    right (the metric positive), as the circuit literature keeps them."""
    ids = lambda words: torch.tensor([single_token_id(model.tokenizer, w) for w in words])  # noqa: E731
    if config.task in GENERATED:
        drawn = _drawn(model, config.task, 2 * config.items, config.seed)
        tokens, mask = to_tokens(model, [d[0] for d in drawn])
        with torch.no_grad():
            right = prepare(logit_diff(ids([d[2] for d in drawn]), ids([d[3] for d in drawn])), model)(
                model(tokens), mask) > 0
        items = [d for d, ok in zip(drawn, right.tolist()) if ok][: config.items]
        if len(items) < 2:
            raise GradGraphError(f"{config.model} gets {len(items)} of {len(drawn)} {config.task} items right: too "
                                 "few to measure a circuit on")
        description = (f"{GENERATED[config.task]}, {len(items)} items (the model is right on "
                       f"{float(right.float().mean()):.1%} of {len(drawn)} drawn)")
        prompts, counterfactuals, good, bad = (list(column) for column in zip(*items))
    else:
        prompts, counterfactuals = read_prompts(config.prompts), read_prompts(config.counterfactuals)
        if len(prompts) != len(counterfactuals):
            raise GradGraphError(f"{len(counterfactuals)} counterfactual prompts for {len(prompts)} prompts; give one each")
        good, bad = [config.good] * len(prompts), [config.bad] * len(prompts)
        description = f"{len(prompts)} prompts ({config.good!r} vs {config.bad!r})"
    tokens, mask = to_tokens(model, prompts)
    other, other_mask = to_tokens(model, counterfactuals)
    if other.shape != tokens.shape or not torch.equal(mask, other_mask):
        raise GradGraphError("each counterfactual must tokenize to as many tokens as its prompt (the edges are "
                             "patched position by position)")
    return tokens, mask, other, ids(good), ids(bad), description


def run(config: Config) -> dict:
    if config.task not in TASKS:
        raise GradGraphError(f"--task must be one of {TASKS}, got {config.task!r}")
    unknown = [m for m in config.methods if m not in ALL]
    if unknown:
        raise GradGraphError(f"unknown methods {unknown}; choose from {list(ALL)}")
    if not 0 < config.size <= 1:
        raise GradGraphError(f"--size is a share of the edges in (0, 1], got {config.size}")
    missing = [f"--{n}" for n in ("prompts", "counterfactuals", "good", "bad") if getattr(config, n) is None]
    if config.task == "prompts" and missing:
        raise GradGraphError(f"gradgraph circuit --task prompts needs {', '.join(missing)}")
    model = load_model(config.model)
    model.requires_grad_(False)
    tokens, mask, other, good, bad, task = _task(model, config)
    metric = logit_diff(good, bad)
    scores, signed, absolute, seconds = {}, {}, {}, {}
    for method in tqdm(config.methods, desc="circuit", unit="method"):
        start = time.perf_counter()
        if method == "random":  # uniform scores on the model's edges: the floor
            graph = edge_graph(model)
            noise = torch.rand(graph.adjacency.shape, generator=torch.Generator().manual_seed(config.seed),
                               dtype=torch.float64)
            scored = EdgeScores(graph, (noise * graph.adjacency)[None], "random")
        else:
            scored = edge_scores(model, tokens, metric, other if method in NEEDS_COUNTERFACTUAL else None,
                                 method=method, steps=config.steps, attention_mask=mask, batch_size=config.batch_size)
        scores[method] = scored
        signed[method] = faithfulness_curve(model, tokens, other, metric, scored, absolute=False, attention_mask=mask)
        absolute[method] = faithfulness_curve(model, tokens, other, metric, scored, absolute=True, attention_mask=mask)
        seconds[method] = time.perf_counter() - start
    first = tokens[0, : int(mask[0].sum())].tolist()
    prompt = dict(tokens=[model.tokenizer.decode([t]) for t in first] if model.tokenizer else [str(t) for t in first],
                  prompt=model.tokenizer.decode(first) if model.tokenizer else "", good=_word(model, good[0]),
                  bad=_word(model, bad[0]))
    return dict(config=config, task=task, model=config.model, scores=scores, signed=signed, absolute=absolute,
                seconds=seconds, prompt=prompt)


def _word(model, token: torch.Tensor) -> str:
    return model.tokenizer.decode([int(token)]) if model.tokenizer else str(int(token))


def _rows(result: dict) -> list[dict]:
    rows = []
    for method in result["scores"]:
        signed, absolute = result["signed"][method], result["absolute"][method]
        for convention in CONVENTIONS:
            cpr, cmd = signed.areas(convention)["CPR"], absolute.areas(convention)["CMD"]
            lo_p, hi_p = signed.intervals(convention, resamples=result["config"].resamples)["CPR"]
            lo_m, hi_m = absolute.intervals(convention, resamples=result["config"].resamples)["CMD"]
            rows.append(dict(method=method, x_axis=convention, CPR=cpr, CPR_low=lo_p, CPR_high=hi_p, CMD=cmd,
                             CMD_low=lo_m, CMD_high=hi_m, seconds=result["seconds"][method]))
    return rows


def _curves(result: dict) -> list[dict]:
    rows = []
    for method in result["scores"]:
        for selection, curve in (("signed", result["signed"][method]), ("absolute", result["absolute"][method])):
            f = curve.faithfulness()
            for i, size in enumerate(curve.sizes):
                rows.append(dict(method=method, selection=selection, size=size, edges=curve.edges[i],
                                 share=curve.shares[i], faithfulness=float(f[i])))
    return rows


def write(result: dict) -> list[dict]:
    """Print the CPR/CMD table; save what was computed; stage the tables, the figure and the circuits."""
    config = result["config"]
    rows = _rows(result)
    print(f"{result['task']}; CPR (signed selection, higher is better) and CMD (absolute, lower is better), "
          "95 % bootstrap intervals over prompts:")
    for r in rows:
        print(f"  {r['method']:<10} x-axis {r['x_axis']:<5}  CPR {r['CPR']:.3f} [{r['CPR_low']:.3f}, {r['CPR_high']:.3f}]"
              f"  CMD {r['CMD']:.3f} [{r['CMD_low']:.3f}, {r['CMD_high']:.3f}]")
    figures = config.figures or str(Path(config.out) / "figures")
    with staged_run(config.out, figures, COMMAND) as out:
        out.save(result)
        out.make("cpr_cmd.csv", lambda: write_csv(out.path("cpr_cmd.csv"), rows))
        out.make("curves.csv", lambda: write_csv(out.path("curves.csv"), _curves(result)))
        made = [out.make("circuit_faithfulness.png", lambda: plot.faithfulness_curves(
            {m: (c.sizes, c.faithfulness().tolist()) for m, c in result["absolute"].items()},
            out.figure("circuit_faithfulness.png"), title=f"Faithfulness of each method's circuits ({result['task']})"))]
        layouts = {}
        for method, scored in result["scores"].items():
            circuit = top_edges(scored, max(1, int(config.size * len(scored.graph))))
            layouts[method] = drawn = layout(circuit, scored)
            out.make(f"circuit_{method}.json", lambda circuit=circuit, scored=scored: out.path(
                f"circuits/{method}.json").write_text(json.dumps(eap_ig_graph(scored, circuit))))
            out.make(f"circuit_tracer_{method}.json", lambda drawn=drawn, method=method: out.path(
                f"circuit_tracer/{method}.json").write_text(json.dumps(circuit_tracer_circuit(
                    drawn, slug=f"circuit-{method}", model=result["model"], **result["prompt"]))))
            made.append(out.make(f"circuit_{method}.png", lambda drawn=drawn, method=method, n=len(circuit): (
                plot.circuit_drawing(drawn, out.figure(f"circuit_{method}.png"),
                                     title=f"{method}'s circuit on {GENERATED.get(config.task, 'your prompts')}: {n} of "
                                           f"{len(scored.graph)} edges"))))
            out.make(f"edges_{method}.csv", lambda scored=scored: write_csv(out.path(f"edges/{method}.csv"), [
                dict(edge=e, score=s) for e, s in sorted(scored.table().items(), key=lambda kv: -abs(kv[1]))]))
        curves = {m: {sel: (c.shares, c.faithfulness().tolist()) for sel, c in (("signed", result["signed"][m]),
                                                                                 ("absolute", result["absolute"][m]))}
                  for m in result["scores"]}
        summary = dict(task=result["task"], model=result["model"], rows=rows, size=config.size,
                       edges=len(next(iter(result["scores"].values())).graph))
        links = {Path(f).name: relative_link(out.final(f), Path(config.out)) for f in made if f is not None}
        out.make("report.html", lambda: out.path("report.html").write_text(
            report.circuit_page(summary, curves, layouts, links)))
    print(f"wrote {config.out}/cpr_cmd.csv, {config.out}/curves.csv, {config.out}/circuits/, {config.out}/report.html")
    return rows


def main(config: Config) -> list[dict]:
    return write(run(config))


def redraw(out: str, figures: str | None = None) -> list[dict]:
    """Draw the tables, figure and circuits of the run saved in ``out`` again, without the model."""
    result = load(out, command=COMMAND)
    result["config"].out, result["config"].figures = str(out), figures
    return write(result)


__all__ = ["ALL", "Config", "TASKS", "main", "redraw", "run"]
