"""Heads, q/k/v pathways and MLPs ranked by every method for any prompts a user brings
(``gradgraph heads``), checked against mean ablation and (with counterfactual prompts) activation
patching.

Config → run → write. The methods are those of ``gradgraph.component_methods`` (attribution and
relevance patching need counterfactual prompts); each prompt's metric is logit(good) − logit(bad)
at ``position``. Agreement with the interventions as in the SVA study (``studies.compare``), with
bootstrap intervals over prompts. Results, figures and an interactive ``report.html`` under ``--out``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from gradgraph import plot, report
from gradgraph.arch.models import load_model
from gradgraph.bootstrap import MIN_ITEMS, cell, intervals_note
from gradgraph.component_methods import METHODS, NEEDS_COUNTERFACTUAL, TOKEN_METHODS, check_methods, component_labels, score
from gradgraph.errors import GradGraphError
from gradgraph.heads import mask
from gradgraph.interventions import PATHWAYS, activation_means, intervene
from gradgraph.labels import Registry
from gradgraph.metrics import logit_diff
from gradgraph.prompts import read_prompts, single_token_id, to_tokens
from gradgraph.studies import head_types
from gradgraph.studies.compare import COLUMN_KIND, agreement, head_grid, importance
from gradgraph.studies.output import check_out, relative_link, staged_run, write_csv
from gradgraph.studies.saved import load

COMMAND = "gradgraph heads"
TRUTHS = {"mean_ablation": "mean ablation", "patching": "activation patching"}


@dataclass
class Config:
    prompts: str  # text file, one prompt per line
    good: str  # the expected next token, e.g. " are"
    bad: str  # the contrasting token, e.g. " is"
    counterfactuals: str | None = None  # aligned counterfactual prompts (for patching)
    position: int = -1  # the metric's position (default: each prompt's last token)
    model: str = "smollm2-135m"
    device: str = "auto"  # where the model runs: auto (a GPU when torch sees one, else the CPU), cpu, cuda, cuda:N, mps
    methods: tuple[str, ...] = tuple(METHODS)
    batch_size: int = 8
    udig_steps: int = 30
    head_sentences: int = 100  # sentences for Mask-LRP's heads
    resamples: int = 1000
    top: int = 8  # components printed per method
    out: str = "results/heads"
    figures: str | None = None  # default: OUT/figures


def rank_components(model, prompts: list[str], good: str, bad: str, *, counterfactuals: list[str] | None = None,
                    position: int = -1, methods=tuple(METHODS), batch_size: int = 8, udig_steps: int = 30,
                    head_mask: torch.Tensor | None = None) -> tuple[dict, dict, dict]:
    """Per method and intervention, every prompt's score of every component ``[prompts, components]``
    (``component_methods.component_labels`` order), and each prompt's token attributions by method."""
    good_id, bad_id = single_token_id(model.tokenizer, good), single_token_id(model.tokenizer, bad)
    if counterfactuals is not None and len(counterfactuals) != len(prompts):
        raise GradGraphError(f"{len(counterfactuals)} counterfactual prompts for {len(prompts)} prompts; give one each")
    methods = check_methods(methods)
    labels = component_labels(model)
    tokens_all, mask_all = to_tokens(model, prompts)
    means = activation_means(model, tokens_all, mask_all)
    collected: dict[str, list[torch.Tensor]] = {}
    truths: dict[str, list[torch.Tensor]] = {}
    token_scores: dict[str, list[list[float]]] = {}
    for start in tqdm(range(0, len(prompts), batch_size), desc="heads", unit="batch"):
        chunk = prompts[start : start + batch_size]
        tokens, mask_ = to_tokens(model, chunk)
        good_ids, bad_ids = torch.full((len(chunk),), good_id), torch.full((len(chunk),), bad_id)
        cf_tokens = None
        if counterfactuals is not None:
            cf_tokens, cf_mask = to_tokens(model, counterfactuals[start : start + batch_size])
            if cf_tokens.shape != tokens.shape or not torch.equal(cf_mask, mask_):
                raise GradGraphError("each counterfactual prompt must have as many tokens as its prompt")
        scores = score(model, tokens, mask_, good_ids, bad_ids, methods=methods, counterfactual=cf_tokens,
                       head_mask=head_mask, position=position, udig_steps=udig_steps)
        for method, values in scores.components.items():
            collected.setdefault(method, []).append(values)
        for method, values in scores.tokens.items():
            for b in range(len(chunk)):
                n = int(mask_[b].sum())
                token_scores.setdefault(method, []).append([None if math.isnan(v) else v for v in values[b, :n].tolist()])
        effects = intervene(model, tokens, mask_, logit_diff(good_ids, bad_ids, pos=position), counterfactual=cf_tokens,
                            means=means, progress=False, kinds=PATHWAYS)
        for truth in TRUTHS:
            if truth in effects:
                truths.setdefault(truth, []).append(torch.stack([effects[truth][x] for x in labels], 1).double().cpu())
    return ({m: torch.cat(v) for m, v in collected.items()}, {t: torch.cat(v) for t, v in truths.items()}, token_scores)


def run(config: Config) -> dict:
    """Scores, interventions, agreement and the rows of ``heads.csv``."""
    check_out(config.out)
    prompts = read_prompts(config.prompts)
    counterfactuals = read_prompts(config.counterfactuals) if config.counterfactuals else None
    methods = check_methods(config.methods)
    if counterfactuals is None:
        dropped = [m for m in methods if m in NEEDS_COUNTERFACTUAL]
        methods = tuple(m for m in methods if m not in NEEDS_COUNTERFACTUAL)
        if dropped:
            print(f"no --counterfactuals: {', '.join(METHODS[m] for m in dropped)} and activation patching left out")
        if not methods:
            raise GradGraphError("every chosen method needs counterfactual prompts; give --counterfactuals")
    model = load_model(config.model, device=config.device)
    single_token_id(model.tokenizer, config.good), single_token_id(model.tokenizer, config.bad)  # fail early
    head_mask = None
    if "mask_lrp" in methods:
        corpus = head_types.default_corpus(model.tokenizer, config.head_sentences, seed=1)
        positional, syntactic = head_types.detect(model, corpus, 0.8, 0.1)
        head_mask = mask(model, "synt+pos", positional=positional, syntactic=syntactic)
    scores, truths, tokens = rank_components(
        model, prompts, config.good, config.bad, counterfactuals=counterfactuals, position=config.position,
        methods=methods, batch_size=config.batch_size, udig_steps=config.udig_steps, head_mask=head_mask)
    registry, labels = Registry.of(model), component_labels(model)
    components = [registry.parse(label) for label in labels]
    rows = []
    for c, (label, component) in enumerate(zip(labels, components)):
        row = dict(component=label, kind=COLUMN_KIND[component.kind])
        row.update({m: float(v[:, c].mean()) for m, v in scores.items()})
        row.update({t: float(v[:, c].mean()) for t, v in truths.items()})
        rows.append(row)
    agreement_rows = [dict(method=METHODS[m], key=m, truth=TRUTHS[t], **r) for m, v in scores.items()
                      for t, truth in truths.items() for r in agreement(v, truth, components, resamples=config.resamples)]
    words = [[model.tokenizer.decode([t]) for t in to_tokens(model, p)[0][0].tolist()] for p in prompts]
    token_items = [dict(prefix=p, tokens=w, subject=-1, attractors=[], condition="",
                        scores={TOKEN_METHODS[m]: tokens[m][i] for m in tokens}) for i, (p, w) in enumerate(zip(prompts, words))]
    return dict(config=config, registry=registry, labels=labels, rows=rows, scores=scores, truths=truths, agreement=agreement_rows,
                tokens=token_items[:12], n_layers=model.cfg.n_layers, n_heads=model.cfg.n_heads, model=config.model)


def write(result: dict) -> list[dict]:
    """Print the top components and the agreement; save what was computed; stage the tables, figures
    and report (each on its own) and publish them together."""
    config, rows = result["config"], result["rows"]
    for key in list(result["scores"]) + list(result["truths"]):
        top = sorted(rows, key=lambda r: -abs(r[key]))[: config.top]
        print(f"top components by {key:<14}: " + ", ".join(f"{r['component']} ({r[key]:+.3g})" for r in top))
    note = intervals_note(result["agreement"])
    if result["agreement"]:
        print("Spearman ρ of each method's head ranking with the interventions' "
              + (f"({note.replace('item', 'prompt')}):" if note else "[95 % basic bootstrap interval]:"))
    for r in result["agreement"]:
        if r["group"] == "heads":
            print(f"  {r['method']:<28} vs {r['truth']:<20} {cell(r)}")
    figures = config.figures or str(Path(config.out) / "figures")
    with staged_run(config.out, figures, COMMAND) as out:
        out.save(result)
        out.make("heads.csv", lambda: write_csv(out.path("heads.csv"), rows))
        out.make("agreement.csv", lambda: write_csv(out.path("agreement.csv"), result["agreement"]))
        heat = out.make("the head heatmaps' values", lambda: _heat(result)) or {}
        made = [out.make(f"heads_{name.split(' ')[0].lower()}.png", lambda name=name, v=v: plot.head_heatmap(
                    v.numpy(), out.figure(f"heads_{name.split(' ')[0].lower()}.png"), label=f"mean |{name}|",
                    title=f"{name} per head ({config.good!r} vs {config.bad!r})"))
                for name, v in heat.items()]
        if result["agreement"]:
            n = len(next(iter(result["scores"].values())))
            spread = "95 % basic bootstrap intervals" if n >= MIN_ITEMS else f"no intervals: {n} prompts, they need {MIN_ITEMS}"
            made.append(out.make("heads_agreement.png", lambda: plot.agreement_plot(
                result["agreement"], out.figure("heads_agreement.png"),
                title=f"Agreement of each method with interventions ({n} prompts, {spread})")))
        made = [f for f in made if f is not None]
        summary = dict(model=result["model"], prompts=len(result["scores"][next(iter(result["scores"]))]),
                       methods=[METHODS[m] for m in result["scores"]], agreement=result["agreement"],
                       good=config.good, bad=config.bad)
        out.make("summary.json", lambda: out.path("summary.json").write_text(json.dumps(summary, indent=1)))
        links = {Path(f).name: relative_link(out.final(f), Path(config.out)) for f in made}
        out.make("report.html", lambda: out.path("report.html").write_text(
            report.heads_page(summary, heat, result["tokens"], links)))
    print(f"wrote {config.out}/heads.csv, {config.out}/report.html")
    return rows


def _heat(result: dict) -> dict[str, torch.Tensor]:
    """Mean |score| of every head's output ``[layers, heads]`` per method and intervention."""
    heat = {METHODS[m]: head_grid(result["registry"], result["labels"], importance(v.numpy()))
            for m, v in result["scores"].items()}
    heat.update({TRUTHS[t]: head_grid(result["registry"], result["labels"], importance(v.numpy()))
                 for t, v in result["truths"].items()})
    return heat


def main(config: Config) -> list[dict]:
    """Rank, print the top components by each method, and write the tables, figures and report."""
    return write(run(config))


def redraw(out: str, figures: str | None = None) -> list[dict]:
    """Draw the tables, figures and report of the run saved in ``out`` again, without the model
    (``gradgraph heads --redraw OUT``); figures go to ``figures`` (default ``OUT/figures``)."""
    result = load(out, command=COMMAND)
    result["config"].out, result["config"].figures = str(out), figures
    return write(result)
