"""The subject–verb agreement study: which heads and pathways carry agreement (the main job).

Config → run → write. ``run`` computes, in stages with progress bars: accuracy on every item; per
batch of items one gradient graph read by Max (top paths, q/k/v/skip shares as in Du et al. 2023),
Abs (gradient flow, float64), Real (gradients for attribution patching) and Entropy (path entropy);
mean ablation and activation patching from the counterfactual (subject number flipped) on a subset;
rankings and Spearman correlations. ``write`` stages figures, tables and a markdown report and
publishes them together (``gradgraph.studies.output``).
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field

import networkx as nx
import torch
from scipy.stats import spearmanr
from tqdm.auto import tqdm

from gradgraph import plot
from gradgraph.branches import BRANCHES, BranchShares, branch_shares
from gradgraph.build import build_graph
from gradgraph.component_graph import component_graph
from gradgraph.components import Component, Registry, top_component_paths
from gradgraph.data import SVAItem, sva_items
from gradgraph.errors import GradGraphError
from gradgraph.evaluate import accuracy_table, evaluate_sva, format_table, take
from gradgraph.interventions import activation_means, attribution_patching, intervene
from gradgraph.metrics import logit_diff
from gradgraph.models import load_model
from gradgraph.paths import path_entropy
from gradgraph.prompts import to_tokens
from gradgraph.scores import graph_scores, stack_effects
from gradgraph.semirings import Abs
from gradgraph.studies.output import staged_run, write_csv


@dataclass
class Config:
    model: str = "smollm2-135m"
    limit: int = 96  # items for the gradient analyses (spread over conditions)
    intervention_items: int = 16  # items for ablation and patching (slow: a forward per component)
    batch_size: int = 8
    examples: int = 3  # sentences whose top component paths are reported
    top_k: int = 100  # scalar top paths searched per example sentence (collapsed into component paths)
    out: str = "results/sva"
    figures: str = "figures"
    seed: int = 0


@dataclass
class Result:
    """Everything ``write`` needs: tables (lists of rows), per-item scores, examples, the summary."""

    config: Config
    registry: Registry
    n_layers: int
    n_heads: int
    accuracy: list[dict]
    shares: dict[str, BranchShares]
    methods: dict[str, torch.Tensor]  # [items, layers, heads + 1], in the order of `items`
    truths: dict[str, torch.Tensor]  # [intervened items, layers, heads + 1]
    intervened: list[int]  # rows of `methods` the interventions ran on
    correlations: list[dict]
    head_rows: list[dict]
    entropy_rows: list[dict]
    per_item: list[dict]
    examples: list[dict]
    component_graph: nx.DiGraph | None
    component_tokens: list[str]
    component_title: str
    summary: dict = field(default_factory=dict)


def _batches(indexed: list[tuple[int, SVAItem]], size: int) -> list[list[tuple[int, SVAItem]]]:
    ordered = sorted(indexed, key=lambda pair: pair[1].n_tokens)  # little padding
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]


def _metric(batch: list[SVAItem]):
    return logit_diff(torch.tensor([i.good_id for i in batch]), torch.tensor([i.bad_id for i in batch]))


@dataclass
class _GraphStage:
    """What the gradient graphs of the chosen items give (scores in the order of the items)."""

    shares: dict[str, BranchShares]
    methods: dict[str, torch.Tensor]  # [items, layers, heads + 1]
    per_item: list[dict]
    examples: list[dict]
    component_graph: tuple[nx.DiGraph, list[str], str] | None


def _graph_stage(model, reg: Registry, chosen: list[SVAItem], config: Config) -> _GraphStage:
    """Per batch of items one graph: branch shares, head scores, attribution patching, entropy,
    component paths of a few example sentences and the component graph of the first."""
    shares: dict[str, list] = defaultdict(list)
    scores: dict[str, list[torch.Tensor]] = defaultdict(list)
    order: list[int] = []  # index into `chosen` of each scored row
    per_item, examples = [], []
    example_graph = None
    for batch_pairs in tqdm(_batches(list(enumerate(chosen)), config.batch_size), desc="gradient graphs", unit="batch"):
        batch = [item for _, item in batch_pairs]
        order += [index for index, _ in batch_pairs]
        tokens, mask = to_tokens(model, [i.prefix for i in batch])
        cf_tokens, _ = to_tokens(model, [i.counterfactual for i in batch])
        graph = build_graph(model, tokens, _metric(batch), attention_mask=mask)
        graph_score = graph_scores(graph)
        subject = torch.tensor([i.subject_pos for i in batch])
        # as in Du et al., the subject is a token other than the one the verb is predicted at
        apart = torch.tensor([i.subject_pos < i.n_tokens - 1 for i in batch])
        for agg in ("oplus", "bucket_sum"):
            if apart.any():
                shares[f"subject/{agg}"].append((branch_shares(graph, subject, agg=agg, values=graph_score.max_backward,
                                                               include=apart), int(apart.sum())))
            shares[f"last/{agg}"].append((branch_shares(graph, -1, agg=agg, values=graph_score.max_backward), len(batch)))
        scores["flow"].append(graph_score.flow_share)
        scores["top_path"].append(graph_score.top_path)
        attr = attribution_patching(model, tokens, cf_tokens, graph_score.gradients, clean=graph.activations)
        scores["attribution"].append(stack_effects(attr, reg))
        entropy = path_entropy(graph).double().cpu()
        for item, h in zip(batch, entropy.tolist()):
            per_item.append(dict(prefix=item.prefix, condition=item.condition, n_attractors=item.n_attractors,
                                 subject_number=item.subject_number, n_tokens=item.n_tokens, path_entropy=h))
        wanted = [b for b, i in enumerate(batch) if i.n_attractors > 0][: config.examples - len(examples)]
        if wanted and example_graph is None:
            b = wanted[0]
            example_graph = (component_graph(graph, Abs, batch=b, min_share=0.005),
                             [model.tokenizer.decode([t]) for t in tokens[b, : batch[b].n_tokens].tolist()],
                             f"|gradient| flow between components: {batch[b].prefix!r} → {batch[b].good!r} vs {batch[b].bad!r}")
        if wanted:
            comp = top_component_paths(graph, k=5, search=config.top_k, items=wanted)
            for b in wanted:
                item = batch[b]
                words = [model.tokenizer.decode([t]) for t in tokens[b, : item.n_tokens].tolist()]
                examples.append(dict(prefix=item.prefix, good=item.good, bad=item.bad, tokens=words,
                                     paths=[dict(components=list(c), weight=w, scalar_paths=n) for c, w, n in comp[b]]))
    rows_of = torch.tensor(order).argsort()  # row r of the concatenated scores is chosen[order[r]]
    methods = {"gradient flow (Abs share)": torch.cat(scores["flow"])[rows_of],
               "top-path value (Max)": torch.cat(scores["top_path"])[rows_of],
               "attribution patching": torch.cat(scores["attribution"])[rows_of]}
    shares_mean = {name: BranchShares.mean(parts) for name, parts in shares.items()}
    return _GraphStage(shares_mean, methods, per_item, examples, example_graph)


def _intervention_stage(model, reg: Registry, chosen: list[SVAItem], config: Config):
    """Mean ablation and activation patching of every head and MLP on a subset of the items:
    ``(effects by name [subset, layers, heads + 1], the rows of chosen they belong to)``."""
    subset = take(chosen, config.intervention_items, seed=config.seed + 1)
    indexed = [(next(n for n, c in enumerate(chosen) if c is item), item) for item in subset]
    tokens_all, mask_all = to_tokens(model, [i.prefix for i in chosen])
    means = activation_means(model, tokens_all, mask_all)
    ablation, patching, rows = [], [], []
    for batch_pairs in tqdm(_batches(indexed, config.intervention_items), desc="ablation + patching", unit="batch"):
        batch = [item for _, item in batch_pairs]
        tokens, mask = to_tokens(model, [i.prefix for i in batch])
        cf_tokens, _ = to_tokens(model, [i.counterfactual for i in batch])
        effects = intervene(model, tokens, mask, _metric(batch), counterfactual=cf_tokens, means=means)
        ablation.append(stack_effects(effects["mean_ablation"], reg))
        patching.append(stack_effects(effects["patching"], reg))
        rows += [index for index, _ in batch_pairs]
    return {"mean ablation |Δ|": torch.cat(ablation), "activation patching |Δ|": torch.cat(patching)}, rows


def _correlations(methods: dict, truths: dict, rows: list[int], n_heads: int) -> list[dict]:
    """Spearman ρ over heads between each method's |score| (on the intervened items) and |effect|."""
    out = []
    for name, value in methods.items():
        mean_sub = value[torch.tensor(rows)].abs().mean(0)
        for truth_name, truth in truths.items():
            rho = spearmanr(mean_sub[:, :n_heads].flatten().numpy(),
                            truth.mean(0).abs()[:, :n_heads].flatten().numpy()).statistic
            out.append(dict(method=name + (" |Δ|" if "patching" in name else ""), ground_truth=truth_name,
                            spearman_heads=float(rho)))
    return out


def _head_rows(reg: Registry, methods: dict, truths: dict) -> list[dict]:
    rows = []
    for layer in range(reg.n_layers):
        for h in range(reg.n_heads + 1):
            component = Component("head", layer, h) if h < reg.n_heads else Component("mlp", layer)
            rows.append(dict(
                component=reg.label(component), layer=layer, head=h if h < reg.n_heads else None,
                flow_share=float(methods["gradient flow (Abs share)"][:, layer, h].mean()),
                top_path=float(methods["top-path value (Max)"][:, layer, h].mean()),
                attribution_patching=float(methods["attribution patching"][:, layer, h].mean()),
                mean_ablation=float(truths["mean ablation |Δ|"][:, layer, h].mean()),
                patching=float(truths["activation patching |Δ|"][:, layer, h].mean()),
            ))
    return rows


def _entropy_rows(per_item: list[dict]) -> list[dict]:
    """Mean path entropy and its standard error per condition and attractor count."""
    groups = defaultdict(list)
    for row in per_item:
        groups[(row["condition"], row["n_attractors"])].append(row["path_entropy"])
    rows = []
    for (condition, n_attr), values in sorted(groups.items()):
        mean = sum(values) / len(values)
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1))
        rows.append(dict(condition=condition, n_attractors=n_attr, n=len(values), mean=mean, sem=sd / math.sqrt(len(values))))
    return rows


def run(config: Config) -> Result:
    """Run the whole study (no files written)."""
    if config.limit < 1 or config.intervention_items < 1:
        raise GradGraphError("--limit and --intervention-items must be positive numbers of items")
    start = time.time()
    model = load_model(config.model)
    reg = Registry.of(model)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    items = sva_items(model.tokenizer, seed=config.seed, prepend_bos=model.cfg.default_prepend_bos)
    results = evaluate_sva(model, items)
    accuracy = accuracy_table(results)
    print(f"\nSVA accuracy of {config.model} ({len(results)} items):\n{format_table(accuracy)}\n")
    chosen = take([i for i in items if i.counterfactual], config.limit, seed=config.seed)
    graphs = _graph_stage(model, reg, chosen, config)
    truths, intervened = _intervention_stage(model, reg, chosen, config)
    correlations = _correlations(graphs.methods, truths, intervened, n_heads)
    head_rows = _head_rows(reg, graphs.methods, truths)
    entropy_rows = _entropy_rows(graphs.per_item)
    heads_only = [r for r in head_rows if r["head"] is not None]
    rankings = {key: [r["component"] for r in sorted(heads_only, key=lambda r: -abs(r[key]))[:10]]
                for key in ("flow_share", "top_path", "attribution_patching", "mean_ablation", "patching")}
    shares = graphs.shares
    summary = dict(
        model=config.model, items_evaluated=len(results), items_analysed=len(chosen),
        items_intervened=len(intervened), accuracy=accuracy, correlations=correlations, rankings=rankings,
        subject_last_layers={agg: [dict(layer=l, **{b: float(shares[f"subject/{agg}"].share[l, i])
                                                    for i, b in enumerate(BRANCHES)})
                                   for l in range(n_layers - 3, n_layers)] for agg in ("oplus", "bucket_sum")},
        entropy=entropy_rows, examples=graphs.examples, seconds=time.time() - start,
    )
    cg, words, title = graphs.component_graph or (None, [], "")
    return Result(config, reg, n_layers, n_heads, accuracy, shares, graphs.methods, truths, intervened, correlations,
                  head_rows, entropy_rows, graphs.per_item, graphs.examples, cg, words, title, summary)


def write(result: Result) -> dict:
    """Stage every table, figure and the report, then publish them together; returns the summary."""
    config, summary = result.config, dict(result.summary)
    n_heads = result.n_heads
    with staged_run(config.out, config.figures, "gradgraph sva") as out:
        share_rows = []
        for name, s in result.shares.items():
            for row in s.rows():
                share_rows.append(dict(where=name.split("/")[0], agg=name.split("/")[1], **row))
        write_csv(out.path("accuracy.csv"), result.accuracy)
        write_csv(out.path("branch_shares.csv"), share_rows)
        write_csv(out.path("components.csv"), result.head_rows)
        write_csv(out.path("correlations.csv"), result.correlations)
        write_csv(out.path("entropy.csv"), result.entropy_rows)
        write_csv(out.path("items.csv"), result.per_item)
        out.path("examples.json").write_text(json.dumps(result.examples, indent=1))
        sub = torch.tensor(result.intervened)
        ablation = result.truths["mean ablation |Δ|"].mean(0).abs()
        figures = [
            plot.sva_accuracy(result.accuracy, out.figure("sva_accuracy.png"),
                              title=f"SVA accuracy, {config.model} ({summary['items_evaluated']} items)"),
            plot.head_heatmap(result.methods["gradient flow (Abs share)"][:, :, :n_heads].mean(0).numpy(),
                              out.figure("sva_head_flow.png"), label="flow share",
                              title=f"Share of |gradient| flow through each head ({summary['items_analysed']} SVA items)"),
            plot.branch_shares_plot({"subject token, ⊕ (oplus)": result.shares["subject/oplus"],
                                     "subject token, bucket sum": result.shares["subject/bucket_sum"],
                                     "last token, ⊕ (oplus)": result.shares["last/oplus"]},
                                    out.figure("sva_branch_shares.png"),
                                    title="Where the top gradient path goes at each layer's attention input"),
            plot.entropy_plot(result.entropy_rows, out.figure("sva_entropy.png"), title="Path entropy of the gradient graph"),
            plot.method_scatter({
                c["method"]: (result.methods[m][sub].abs().mean(0)[:, :n_heads].flatten().numpy(),
                              ablation[:, :n_heads].flatten().numpy(), c["spearman_heads"], "|mean-ablation effect|")
                for m, c in zip(result.methods, [c for c in result.correlations
                                                 if c["ground_truth"] == "mean ablation |Δ|"])},
                out.figure("sva_methods_vs_ablation.png"), title="Head scores against mean-ablation effects"),
        ]
        if result.examples:
            first = result.examples[0]
            figures.append(plot.circuit_plot(
                [(tuple(p["components"]), p["weight"], p["scalar_paths"]) for p in first["paths"]], first["tokens"],
                out.figure("sva_top_paths.png"), registry=result.registry,
                title=f"Top component paths: {first['prefix']!r} → {first['good']!r} vs {first['bad']!r}"))
        if result.component_graph is not None:
            cg = result.component_graph
            nx.write_graphml(cg, out.path("component_graph.graphml"))
            out.path("component_graph.json").write_text(json.dumps(nx.node_link_data(cg, edges="links"), indent=1))
            figures.append(plot.component_graph_plot(cg, result.component_tokens, out.figure("sva_component_graph.png"),
                                                     title=result.component_title, registry=result.registry))
        summary["figures"] = [str(out.final(f)) for f in figures]
        out.path("summary.json").write_text(json.dumps(summary, indent=1))
        text = report(summary, result.shares)
        out.path("report.md").write_text(text)
    print(text)
    return summary


def main(config: Config) -> dict:
    """Run the study and write its results (``gradgraph sva``)."""
    return write(run(config))


def report(summary: dict, shares: dict[str, BranchShares]) -> str:
    """A short markdown report stating the findings in numbers."""
    overall = next(r for r in summary["accuracy"] if r["condition"] == "all")
    lines = [
        f"# Subject–verb agreement in {summary['model']}",
        "",
        f"- Accuracy (good verb's logit above the bad one's): **{overall['accuracy']:.3f}** over {overall['n']} items.",
    ]
    for row in summary["accuracy"]:
        if row["condition"] != "all":
            lines.append(f"  - {row['condition']}, {row['n_attractors']} attractor(s): {row['accuracy']:.3f} "
                         f"(mean logit difference {row['mean_logit_diff']:+.2f})")
    lines += ["", "## Top-path branches at the subject token (Max semiring; items whose subject is not the last "
              "token, i.e. all but the simple condition)", ""]
    lines.append("| layer | agg | q | k | v | skip |")
    lines.append("|---|---|---|---|---|---|")
    for agg, rows in summary["subject_last_layers"].items():
        for r in rows:
            lines.append(f"| {r['layer']} | {agg} | {r['q']:.3f} | {r['k']:.3f} | {r['v']:.3f} | {r['skip']:.3f} |")
    last = shares["last/oplus"].share
    skip_layers = int((last[:, 3] > 0.5).sum())
    lines += ["", f"From the last token the top path takes the skip in {skip_layers} of {last.shape[0]} layers (oplus).",
              "Du et al. (2023) found on a 6-layer BERT that 76 % of the subject's top-path gradient in the last layer "
              "runs through the keys.", "", "## Heads", ""]
    for key, top in summary["rankings"].items():
        lines.append(f"- top heads by {key}: {', '.join(top[:6])}")
    lines += ["", "| method | ground truth | Spearman ρ (heads) |", "|---|---|---|"]
    for c in summary["correlations"]:
        lines.append(f"| {c['method']} | {c['ground_truth']} | {c['spearman_heads']:+.3f} |")
    lines += ["", "## Path entropy", "",
              "Entropy grows with the number of paths, hence with sentence length: compare attractor counts "
              "within a condition.", "", "| condition | attractors | n | mean (nats) | s.e.m. |", "|---|---|---|---|---|"]
    for r in summary["entropy"]:
        lines.append(f"| {r['condition']} | {r['n_attractors']} | {r['n']} | {r['mean']:.2f} | {r['sem']:.2f} |")
    lines += ["", "## Top component paths", ""]
    for ex in summary["examples"]:
        lines.append(f"- {ex['prefix']!r} → {ex['good']!r} (vs {ex['bad']!r}):")
        for p in ex["paths"]:
            lines.append(f"  - {p['weight']:+.3g}: {' → '.join(p['components'])}")
    lines += ["", f"Run time: {summary['seconds']:.0f} s. Figures: {', '.join(summary['figures'])}.", ""]
    return "\n".join(lines)
