"""Head ranking by every method for any prompts a user brings (``gradgraph heads``).

Methods: share of |gradient| flow (Abs), value of the best path through the head relative to the
best path overall (Max), attribution patching (needs counterfactual prompts), mean ablation over
the prompts, and activation patching (needs counterfactual prompts).
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from tqdm.auto import tqdm

from gradgraph import hooks, plot
from gradgraph.backprop import backprop, forward
from gradgraph.build import build_graph
from gradgraph.errors import GradGraphError
from gradgraph.interventions import activation_means, attribution_patching, intervene
from gradgraph.metrics import logit_diff
from gradgraph.prompts import single_token_id, to_tokens
from gradgraph.semirings import Abs, Max, Real


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


def head_scores(graph, values: dict[str, torch.Tensor], reduce: str) -> torch.Tensor:
    """[batch, n_layers, n_heads + 1]: per head (hook_z) and MLP (hook_mlp_out), summed or maxed."""
    out = []
    for layer in range(graph.n_layers):
        z = values[hooks.name("z", layer)][0].double()  # [b, p, h, e]
        mlp = values[hooks.name("mlp_out", layer)][0].double()  # [b, p, d]
        if reduce == "sum":
            out.append(torch.cat([z.sum(dim=(1, 3)), mlp.sum(dim=(1, 2))[:, None]], 1))
        else:
            out.append(torch.cat([z.amax(dim=(1, 3)), mlp.amax(dim=(1, 2))[:, None]], 1))
    return torch.stack(out, 1).cpu()



def graph_scores(model, graph, wanted: set[str]) -> dict[str, torch.Tensor]:
    """Per-item [batch, layers, heads + 1] scores from one graph: flow share, top-path value, and
    the Real gradients at head outputs / MLP outputs (for attribution patching)."""
    best_bwd = backprop(graph, Max)
    best_fwd = forward(graph, Max)
    best = {n: Max.times(best_fwd[n], best_bwd[n]) for n in wanted}
    overall = best_bwd[graph.sources[0]][0].flatten(1).amax(1).double().cpu()
    for source in graph.sources[1:]:
        overall = torch.maximum(overall, best_bwd[source][0].flatten(1).amax(1).double().cpu())
    abs_bwd = backprop(graph, Abs, dtype=torch.float64)
    abs_fwd = forward(graph, Abs, dtype=torch.float64)
    flows = {n: abs_fwd[n] * abs_bwd[n] for n in wanted}
    total = sum(abs_bwd[s][0].flatten(1).sum(1).cpu() for s in graph.sources)
    grads = {n: v[0] for n, v in backprop(graph, Real).items() if n in wanted}
    return dict(
        flow_share=head_scores(graph, flows, "sum") / total[:, None, None],
        top_path=head_scores(graph, best, "max") / overall[:, None, None],
        gradients=grads,
        max_values=best_bwd,
    )


def rank_heads(
    model,
    prompts: list[str],
    good: str,
    bad: str,
    *,
    counterfactuals: list[str] | None = None,
    position: int = -1,
    batch_size: int = 8,
    out: str | Path = "results/heads",
    figures: str | Path = "figures",
) -> list[dict]:
    """Rank every head and MLP by every method; writes ``heads.csv`` and heatmaps; returns the rows."""
    good_id, bad_id = single_token_id(model.tokenizer, good), single_token_id(model.tokenizer, bad)
    if counterfactuals is not None and len(counterfactuals) != len(prompts):
        raise GradGraphError(f"{len(counterfactuals)} counterfactual prompts for {len(prompts)} prompts; give one each")
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    wanted = {hooks.name(kind, layer) for layer in range(n_layers) for kind in ("z", "mlp_out")}
    metric_for = lambda n: logit_diff(torch.full((n,), good_id), torch.full((n,), bad_id), pos=position)  # noqa: E731
    tokens_all, mask_all = to_tokens(model, prompts)
    means = activation_means(model, tokens_all, mask_all)
    collected: dict[str, list[torch.Tensor]] = {k: [] for k in ("flow_share", "top_path", "attribution", "ablation", "patching")}
    for start in tqdm(range(0, len(prompts), batch_size), desc="heads", unit="batch"):
        chunk = prompts[start : start + batch_size]
        tokens, mask = to_tokens(model, chunk)
        metric = metric_for(len(chunk))
        graph = build_graph(model, tokens, metric, attention_mask=mask)
        scores = graph_scores(model, graph, wanted)
        collected["flow_share"].append(scores["flow_share"])
        collected["top_path"].append(scores["top_path"])
        cf_tokens = None
        if counterfactuals is not None:
            cf_tokens, cf_mask = to_tokens(model, counterfactuals[start : start + batch_size])
            if cf_tokens.shape != tokens.shape or not torch.equal(cf_mask, mask):
                raise GradGraphError("each counterfactual prompt must have as many tokens as its prompt")
            attr = attribution_patching(model, tokens, cf_tokens, scores["gradients"])
            collected["attribution"].append(stack_effects(attr, n_layers, n_heads))
        effects = intervene(model, tokens, mask, metric, counterfactual=cf_tokens, means=means, progress=False)
        collected["ablation"].append(stack_effects(effects["mean_ablation"], n_layers, n_heads))
        if cf_tokens is not None:
            collected["patching"].append(stack_effects(effects["patching"], n_layers, n_heads))
    means_of = {k: torch.cat(v).mean(0) for k, v in collected.items() if v}
    rows = []
    for layer in range(n_layers):
        for h in range(n_heads + 1):
            row = dict(component=f"L{layer}H{h}" if h < n_heads else f"MLP{layer}", layer=layer,
                       head=h if h < n_heads else "")
            row.update({k: float(v[layer, h]) for k, v in means_of.items()})
            rows.append(row)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "heads.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for key, value in means_of.items():
        plot.head_heatmap(value[:, :n_heads].abs().numpy(), Path(figures) / f"heads_{key}.png",
                          title=f"{key} per head ({len(prompts)} prompts, {good!r} vs {bad!r})", label=f"|{key}|")
    return rows


def stack_effects(effects: dict[str, torch.Tensor], n_layers: int, n_heads: int) -> torch.Tensor:
    """{label: [batch]} -> [batch, layers, heads + 1]."""
    return torch.stack([torch.stack([effects[f"L{l}H{h}"] for h in range(n_heads)] + [effects[f"MLP{l}"]], 1)
                        for l in range(n_layers)], 1).double().cpu()
