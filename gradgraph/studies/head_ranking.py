"""Head ranking by every method for any prompts a user brings (``gradgraph heads``).

Config → run → write. Methods: share of |gradient| flow (Abs), value of the best path through the
head relative to the best path overall (Max), attribution patching (needs counterfactual prompts),
mean ablation over the prompts, and activation patching (needs counterfactual prompts).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from gradgraph import plot
from gradgraph.build import build_graph
from gradgraph.components import Component, Registry
from gradgraph.errors import GradGraphError
from gradgraph.interventions import activation_means, attribution_patching, intervene
from gradgraph.metrics import logit_diff
from gradgraph.models import load_model
from gradgraph.prompts import single_token_id, to_tokens
from gradgraph.scores import graph_scores, stack_effects
from gradgraph.studies.output import staged_run, write_csv


@dataclass
class Config:
    prompts: str  # text file, one prompt per line
    good: str  # the expected next token, e.g. " are"
    bad: str  # the contrasting token, e.g. " is"
    counterfactuals: str | None = None  # aligned counterfactual prompts (for patching)
    position: int = -1  # the metric's position (default: each prompt's last token)
    model: str = "smollm2-135m"
    batch_size: int = 8
    top: int = 8  # heads printed per method
    out: str = "results/heads"
    figures: str = "figures"


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line; an empty line is an error (it would silently shift any pairing)."""
    path = Path(path)
    if not path.is_file():
        raise GradGraphError(f"prompts file {path} does not exist")
    lines = path.read_text().splitlines()
    while lines and not lines[-1].strip():
        lines.pop()  # trailing newlines are fine
    empty = [n + 1 for n, line in enumerate(lines) if not line.strip()]
    if empty:
        raise GradGraphError(f"{path} has empty line(s) {empty[:5]}; give one non-empty prompt per line")
    if not lines:
        raise GradGraphError(f"{path} has no prompts")
    return lines


def rank_heads(
    model,
    prompts: list[str],
    good: str,
    bad: str,
    *,
    counterfactuals: list[str] | None = None,
    position: int = -1,
    batch_size: int = 8,
) -> dict[str, torch.Tensor]:
    """Per method, the mean score of every head and MLP over the prompts: ``[n_layers, n_heads + 1]``."""
    good_id, bad_id = single_token_id(model.tokenizer, good), single_token_id(model.tokenizer, bad)
    if counterfactuals is not None and len(counterfactuals) != len(prompts):
        raise GradGraphError(f"{len(counterfactuals)} counterfactual prompts for {len(prompts)} prompts; give one each")
    reg = Registry.of(model)
    tokens_all, mask_all = to_tokens(model, prompts)
    means = activation_means(model, tokens_all, mask_all)
    collected: dict[str, list[torch.Tensor]] = {k: [] for k in ("flow_share", "top_path", "attribution", "ablation",
                                                                "patching")}
    for start in tqdm(range(0, len(prompts), batch_size), desc="heads", unit="batch"):
        chunk = prompts[start : start + batch_size]
        tokens, mask = to_tokens(model, chunk)
        metric = logit_diff(torch.full((len(chunk),), good_id), torch.full((len(chunk),), bad_id), pos=position)
        graph = build_graph(model, tokens, metric, attention_mask=mask)
        scores = graph_scores(graph)
        collected["flow_share"].append(scores.flow_share)
        collected["top_path"].append(scores.top_path)
        cf_tokens = None
        if counterfactuals is not None:
            cf_tokens, cf_mask = to_tokens(model, counterfactuals[start : start + batch_size])
            if cf_tokens.shape != tokens.shape or not torch.equal(cf_mask, mask):
                raise GradGraphError("each counterfactual prompt must have as many tokens as its prompt")
            attr = attribution_patching(model, tokens, cf_tokens, scores.gradients, clean=graph.activations)
            collected["attribution"].append(stack_effects(attr, reg))
        effects = intervene(model, tokens, mask, metric, counterfactual=cf_tokens, means=means, progress=False)
        collected["ablation"].append(stack_effects(effects["mean_ablation"], reg))
        if cf_tokens is not None:
            collected["patching"].append(stack_effects(effects["patching"], reg))
    return {k: torch.cat(v).mean(0) for k, v in collected.items() if v}


def run(config: Config) -> tuple[list[dict], dict[str, torch.Tensor], int]:
    """The rows of ``heads.csv``, the per-method score tables and the model's head count."""
    prompts = read_prompts(config.prompts)
    counterfactuals = read_prompts(config.counterfactuals) if config.counterfactuals else None
    model = load_model(config.model)
    scores = rank_heads(model, prompts, config.good, config.bad, counterfactuals=counterfactuals,
                        position=config.position, batch_size=config.batch_size)
    n_heads = model.cfg.n_heads
    reg = Registry.of(model)
    rows = []
    for layer in range(model.cfg.n_layers):
        for h in range(n_heads + 1):
            component = Component("head", layer, h) if h < n_heads else Component("mlp", layer)
            row = dict(component=reg.label(component), layer=layer, head=h if h < n_heads else "")
            row.update({k: float(v[layer, h]) for k, v in scores.items()})
            rows.append(row)
    return rows, scores, n_heads


def write(config: Config, rows: list[dict], scores: dict[str, torch.Tensor], n_heads: int) -> None:
    with staged_run(config.out, config.figures, "gradgraph heads") as out:
        write_csv(out.path("heads.csv"), rows)
        for key, value in scores.items():
            plot.head_heatmap(value[:, :n_heads].abs().numpy(), out.figure(f"heads_{key}.png"), label=f"|{key}|",
                              title=f"{key} per head ({config.good!r} vs {config.bad!r})")


def main(config: Config) -> list[dict]:
    """Rank, print the top heads by each method, and write ``heads.csv`` and heatmaps."""
    rows, scores, n_heads = run(config)
    write(config, rows, scores, n_heads)
    heads = [r for r in rows if r["head"] != ""]
    for key in scores:
        top = sorted(heads, key=lambda r: -abs(r[key]))[: config.top]
        print(f"top heads by {key:<12}: " + ", ".join(f"{r['component']} ({r[key]:+.3g})" for r in top))
    print(f"wrote {config.out}/heads.csv and {config.figures}/heads_*.png")
    return rows
