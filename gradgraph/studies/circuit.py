"""Circuits found and measured (``gradgraph circuit``): every edge method's scores on a task, the
faithfulness sweep of its circuits over MIB's sizes, CPR and CMD under both x-axis conventions
with bootstrap intervals over prompts, random circuits as the floor, and each method's circuit at
one size in EAP-IG's graph JSON.

Config → run → write. The task is IOI (``gradgraph.data.ioi``: the items the model gets right,
ABC counterfactuals) or the user's own prompts with aligned counterfactuals and a (good, bad) token
pair. CPR comes from the signed selection and CMD from the absolute one, as MIB scores them.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from gradgraph import plot
from gradgraph.arch.models import load_model
from gradgraph.circuit_export import eap_ig_graph
from gradgraph.circuit_faithfulness import CONVENTIONS, faithfulness_curve
from gradgraph.circuits import top_edges
from gradgraph.data.ioi import ioi_items
from gradgraph.edge_methods import METHODS, NEEDS_COUNTERFACTUAL, edge_scores
from gradgraph.edges import EdgeScores, edge_graph
from gradgraph.errors import GradGraphError
from gradgraph.metrics import logit_diff, prepare
from gradgraph.prompts import read_prompts, single_token_id, to_tokens
from gradgraph.studies.output import staged_run, write_csv
from gradgraph.studies.saved import load

COMMAND = "gradgraph circuit"
TASKS = ("ioi", "prompts")
ALL = METHODS + ("random",)


@dataclass
class Config:
    task: str = "ioi"
    items: int = 32  # IOI items the model gets right
    prompts: str | None = None  # --task prompts: a text file, one prompt per line
    counterfactuals: str | None = None  # aligned counterfactual prompts, one per line
    good: str | None = None  # the expected next token
    bad: str | None = None  # the contrasting token
    methods: tuple[str, ...] = ALL
    steps: int = 5  # EAP-IG's points
    size: float = 0.01  # the share of edges of each method's exported circuit
    resamples: int = 1000
    model: str = "smollm2-135m"
    seed: int = 0
    out: str = "results/circuit"
    figures: str | None = None  # default: OUT/figures


def _task(model, config: Config):
    """``(tokens, mask, counterfactual tokens, good ids, bad ids, description)``: the metric is
    ``logit(good) − logit(bad)`` at each prompt's last token."""
    if config.task == "ioi":
        drawn = ioi_items(model.tokenizer, 2 * config.items, seed=config.seed)
        tokens, mask = to_tokens(model, [i.prompt for i in drawn])
        ids = lambda words: torch.tensor([single_token_id(model.tokenizer, w) for w in words])  # noqa: E731
        with torch.no_grad():
            right = prepare(logit_diff(ids([i.io for i in drawn]), ids([i.s for i in drawn])), model)(model(tokens), mask) > 0
        items = [i for i, ok in zip(drawn, right.tolist()) if ok][: config.items]
        if len(items) < 2:
            raise GradGraphError(f"{config.model} gets {len(items)} of {len(drawn)} IOI items right: too few to "
                                 "measure a circuit on")
        tokens, mask = to_tokens(model, [i.prompt for i in items])
        other, _ = to_tokens(model, [i.counterfactual for i in items])
        return tokens, mask, other, ids([i.io for i in items]), ids([i.s for i in items]), f"IOI, {len(items)} items (the model is right on {float(right.float().mean()):.1%} drawn)"
    prompts, counterfactuals = read_prompts(config.prompts), read_prompts(config.counterfactuals)
    if len(prompts) != len(counterfactuals):
        raise GradGraphError(f"{len(counterfactuals)} counterfactual prompts for {len(prompts)} prompts; give one each")
    tokens, mask = to_tokens(model, prompts)
    other, other_mask = to_tokens(model, counterfactuals)
    if other.shape != tokens.shape or not torch.equal(mask, other_mask):
        raise GradGraphError("each counterfactual must tokenize to as many tokens as its prompt (the edges are "
                             "patched position by position)")
    good, bad = (torch.full((len(prompts),), single_token_id(model.tokenizer, w)) for w in (config.good, config.bad))
    return tokens, mask, other, good, bad, f"{len(prompts)} prompts ({config.good!r} vs {config.bad!r})"


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
                                 method=method, steps=config.steps, attention_mask=mask)
        scores[method] = scored
        signed[method] = faithfulness_curve(model, tokens, other, metric, scored, absolute=False, attention_mask=mask)
        absolute[method] = faithfulness_curve(model, tokens, other, metric, scored, absolute=True, attention_mask=mask)
        seconds[method] = time.perf_counter() - start
    return dict(config=config, task=task, model=config.model, scores=scores, signed=signed, absolute=absolute,
                seconds=seconds)


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
        out.make("circuit_faithfulness.png", lambda: plot.faithfulness_curves(
            {m: (c.sizes, c.faithfulness().tolist()) for m, c in result["absolute"].items()},
            out.figure("circuit_faithfulness.png"), title=f"Faithfulness of each method's circuits ({result['task']})"))
        for method, scored in result["scores"].items():
            circuit = top_edges(scored, int(config.size * len(scored.graph)))
            out.make(f"circuit_{method}.json", lambda circuit=circuit, scored=scored: out.path(
                f"circuits/{method}.json").write_text(json.dumps(eap_ig_graph(scored, circuit))))
            out.make(f"edges_{method}.csv", lambda scored=scored: write_csv(out.path(f"edges/{method}.csv"), [
                dict(edge=e, score=s) for e, s in sorted(scored.table().items(), key=lambda kv: -abs(kv[1]))]))
    print(f"wrote {config.out}/cpr_cmd.csv, {config.out}/curves.csv, {config.out}/circuits/")
    return rows


def main(config: Config) -> list[dict]:
    return write(run(config))


def redraw(out: str, figures: str | None = None) -> list[dict]:
    """Draw the tables, figure and circuits of the run saved in ``out`` again, without the model."""
    result = load(out, command=COMMAND)
    result["config"].out, result["config"].figures = str(out), figures
    return write(result)


__all__ = ["ALL", "Config", "TASKS", "main", "redraw", "run"]
