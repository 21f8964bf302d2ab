"""The subject–verb agreement study: which heads, q/k/v pathways and MLPs carry agreement, by every
method, checked against interventions (the main job, ``gradgraph sva``).

Config → run → write. ``run`` computes, in stages with progress bars:

1. accuracy on every item (800, from the project's templates);
2. on a balanced subset, per batch of items one recorded forward pass read by every chosen method
   (``gradgraph.component_methods``): gradient flow, best path (Max), attribution patching,
   relevance patching (RelP), AttnLRP, Mask-LRP (heads from ``gradgraph.heads`` on sentences the
   project ships) and UDIG conductance (its own path per item, on the intervention items); token
   attributions; q/k/v/skip shares at the subject for gradient, relevance and conductance beside
   Du et al.'s top path; path entropy, also divided by log(number of paths); the best component
   paths that start at the subject;
3. mean ablation and activation patching of every head, q/k/v input and MLP on a subset;
4. Spearman ρ and top-k overlap of every method with both interventions, with bootstrap intervals
   over items; how often each method ranks the subject above every attractor.

``write`` publishes tables, figures (``OUT/figures`` unless told otherwise), ``report.md``, the
interactive ``report.html`` and the component graph (GraphML, node-link JSON, circuit-tracer's
format) together (``gradgraph.studies.output``).
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx
import torch
from tqdm.auto import tqdm

from gradgraph import plot, report
from gradgraph.allocator import hand_back
from gradgraph.arch import names
from gradgraph.arch.models import load_model
from gradgraph.backprop import backprop
from gradgraph.bootstrap import MIN_ITEMS, cell, intervals_note
from gradgraph.branches import BRANCHES, BranchShares, branch_shares
from gradgraph.circuit_tracer import circuit_tracer_graph
from gradgraph.component_graph import component_graph
from gradgraph.component_methods import METHODS, TOKEN_METHODS, check_methods, component_labels, score
from gradgraph.components import top_component_paths
from gradgraph.data import SVAItem, sva_items
from gradgraph.errors import GradGraphError
from gradgraph.evaluate import accuracy_table, evaluate_sva, format_table, take
from gradgraph.heads import mask
from gradgraph.interventions import PATHWAYS, activation_means, intervene
from gradgraph.labels import Registry
from gradgraph.metrics import logit_diff
from gradgraph.paths import path_count, path_entropy
from gradgraph.prompts import to_tokens
from gradgraph.semirings import Abs, Max
from gradgraph.studies import head_types
from gradgraph.studies.compare import COLUMN_KIND, agreement, head_grid, importance, subject_wins
from gradgraph.studies.output import check_out, relative_link, staged_run, write_csv
from gradgraph.studies.saved import load

COMMAND = "gradgraph sva"
INTERVENTION_ITEMS = 16  # the default, when --limit is at least that
TRUTHS = {"mean_ablation": "mean ablation", "patching": "activation patching"}
SHARES = {"top_path": "best path (Du et al.)", "flow": "gradient flow", "attn_lrp": "AttnLRP relevance",
          "mask_lrp": "Mask-LRP relevance", "udig": "UDIG conductance"}


@dataclass
class Config:
    model: str = "smollm2-135m"
    device: str = "auto"  # where the model runs: auto (a GPU when torch sees one, else the CPU), cpu, cuda, cuda:N, mps
    limit: int = 96  # items for the graph methods (spread over conditions)
    # items for ablation and patching (and UDIG: each integrates a path); None: 16, or all when --limit is smaller
    intervention_items: int | None = None
    batch_size: int = 8
    methods: tuple[str, ...] = tuple(METHODS)
    udig_steps: int = 30  # UDIG's anchors m
    head_sentences: int = 100  # sentences for Mask-LRP's syntactic and positional heads
    examples: int = 3  # sentences whose component paths are reported
    top_k: int = 100  # scalar top paths searched per example sentence (collapsed into component paths)
    resamples: int = 1000  # bootstrap resamples of the items
    out: str = "results/sva"
    figures: str | None = None  # default: OUT/figures
    seed: int = 0


@dataclass
class Result:
    """Everything ``write`` needs."""

    config: Config
    registry: Registry
    labels: list[str]  # component labels, the columns of every score table
    n_layers: int
    n_heads: int
    accuracy: list[dict]
    methods: dict[str, torch.Tensor]  # [items, components], in the order of `items`
    truths: dict[str, torch.Tensor]  # [intervened items, components]
    intervened: list[int]  # rows of `methods` the interventions ran on
    agreement: list[dict]
    components: list[dict]
    subject: list[dict]
    shares: dict[str, BranchShares]
    entropy: list[dict]
    per_item: list[dict]
    examples: list[dict]
    graph: dict | None  # the report's component graph of the first example
    tokens: list[dict]  # per-item token attributions by method (for the report)
    summary: dict = field(default_factory=dict)


def _batches(indexed: list[tuple[int, SVAItem]], size: int) -> list[list[tuple[int, SVAItem]]]:
    ordered = sorted(indexed, key=lambda pair: pair[1].n_tokens)  # little padding
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]


def _ids(batch: list[SVAItem]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor([i.good_id for i in batch]), torch.tensor([i.bad_id for i in batch])


@dataclass
class _GraphStage:
    methods: dict[str, torch.Tensor]
    tokens: dict[str, list[torch.Tensor]]  # method -> per item [n_tokens]
    shares: dict[str, BranchShares]
    per_item: list[dict]
    examples: list[dict]
    graph: dict | None
    udig_delta: list[float]
    seconds: dict[str, float]


def _example_graph(scores, b: int, item: SVAItem, words: list[str], labels: list[str]) -> dict:
    """Nodes (components at positions, with every method's value) and edges (gradient flow and
    best path between components) of one item, for the report and circuit-tracer."""
    graph = scores.graph
    flows = {name: component_graph(graph, semiring, batch=b, min_share=0.002)
             for name, semiring in (("flow", Abs), ("top_path", Max))}
    edges: dict[tuple[str, str], dict[str, float]] = {}
    for name, cg in flows.items():
        for u, v, data in cg.edges(data=True):
            edges.setdefault((u, v), {})[name] = data["weight"] / cg.graph["total"]
    n = item.n_tokens
    registry = Registry.of(graph)
    nodes = {}
    for u, v in edges:
        for label in (u, v):
            nodes.setdefault(label, {})
    for label in nodes:
        values = {}
        if label == names.METRIC:
            values = {m: None for m in scores.positions}
        elif (c := registry.parse(label)).kind == "embed":
            values = {m: float(t[b, c.position]) for m, t in scores.tokens.items() if m in scores.positions}
        else:
            column = labels.index(registry.everywhere(label))
            values = {m: float(at[b, c.position, column]) for m, at in scores.positions.items()}
        nodes[label] = {k: (None if v is None or math.isnan(v) else v) for k, v in values.items()}
    return dict(prefix=item.prefix, good=item.good, bad=item.bad, tokens=words[:n], n_tokens=n,
                nodes=nodes, edges=[dict(source=u, target=v, values=w) for (u, v), w in edges.items()],
                methods={m: METHODS[m] for m in scores.positions}, edge_methods={m: METHODS[m] for m in flows})


def _graph_stage(model, chosen: list[SVAItem], udig_rows: set[int], head_mask, config: Config) -> _GraphStage:
    """Per batch of items one recording read by every method (UDIG on ``udig_rows``)."""
    labels = component_labels(model)
    methods = check_methods(config.methods)
    rows: dict[str, list] = defaultdict(list)
    token_rows: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)
    shares: dict[str, list] = defaultdict(list)
    order: list[int] = []
    per_item, examples = [], []
    example_graph, udig_delta, clock = None, {}, defaultdict(float)
    for batch_pairs in tqdm(_batches(list(enumerate(chosen)), config.batch_size), desc="graph methods", unit="batch"):
        batch = [item for _, item in batch_pairs]
        order += [index for index, _ in batch_pairs]
        tokens, mask_ = to_tokens(model, [i.prefix for i in batch])
        cf_tokens, _ = to_tokens(model, [i.counterfactual for i in batch])
        good, bad = _ids(batch)
        udig = torch.tensor([index in udig_rows for index, _ in batch_pairs])
        scores = score(model, tokens, mask_, good, bad, methods=methods, counterfactual=cf_tokens, head_mask=head_mask,
                       udig=udig, udig_steps=config.udig_steps)
        for name, seconds in scores.seconds.items():
            clock[name] += seconds
        for method, values in scores.components.items():
            rows[method].append(values)
        for (index, item), b in zip(batch_pairs, range(len(batch))):
            for method, values in scores.tokens.items():
                token_rows[method][index] = values[b, : item.n_tokens]
            if scores.udig_delta is not None and bool(udig[b]):
                udig_delta[index] = float(scores.udig_delta[b])
        subject = torch.tensor([i.subject_pos for i in batch])
        apart = torch.tensor([i.subject_pos < i.n_tokens - 1 for i in batch])  # Du et al.: not the verb's position
        for method, branch in scores.branches.items():
            include = apart if branch.include is None else apart & branch.include
            if include.any():
                shares[f"subject/{method}"].append((branch_shares(scores.graph, subject, semiring=branch.semiring,
                                                                  agg=branch.agg, values=branch.values, include=include),
                                                    int(include.sum())))
            if method == "top_path":
                shares["last/top_path"].append((branch_shares(scores.graph, -1, semiring=Max, agg="oplus",
                                                              values=branch.values), len(batch)))
        entropy, count = path_entropy(scores.graph).double().cpu(), path_count(scores.graph).double().cpu()
        for item, h, n in zip(batch, entropy.tolist(), count.tolist()):
            per_item.append(dict(prefix=item.prefix, condition=item.condition, n_attractors=item.n_attractors,
                                 subject_number=item.subject_number, n_tokens=item.n_tokens, path_entropy=h,
                                 log_paths=n, normalised_entropy=h / n))
        wanted = [b for b, i in enumerate(batch) if i.n_attractors > 0 and i.subject_pos < i.n_tokens - 1]
        wanted = wanted[: config.examples - len(examples)]
        if wanted:
            best = backprop(scores.graph, Max)  # one Max pass for both searches
            from_subject = top_component_paths(scores.graph, k=5, search=config.top_k, items=wanted, sources=subject,
                                               best=best)
            overall = top_component_paths(scores.graph, k=3, search=config.top_k, items=wanted, best=best)
            for b in wanted:
                item = batch[b]
                words = [model.tokenizer.decode([t]) for t in tokens[b, : item.n_tokens].tolist()]
                examples.append(dict(
                    prefix=item.prefix, good=item.good, bad=item.bad, tokens=words, subject=item.subject_pos,
                    attractors=list(item.attractor_pos),
                    from_subject=[dict(components=list(c), weight=w, scalar_paths=n) for c, w, n in from_subject[b]],
                    overall=[dict(components=list(c), weight=w, scalar_paths=n) for c, w, n in overall[b]]))
                if example_graph is None:
                    example_graph = _example_graph(scores, b, item, words, labels)
            del best
        del scores  # this batch's graph, freed before the next batch records its own
        hand_back()  # what this batch freed, returned: the next batch's peak does not stack on its scattered pages
    rows_of = torch.tensor(order).argsort()  # row r of the concatenated scores is chosen[order[r]]
    tokens = {m: [values[i] for i in range(len(chosen))] for m, values in token_rows.items()}
    return _GraphStage({m: torch.cat(v)[rows_of] for m, v in rows.items()}, tokens,
                       {name: BranchShares.mean(parts) for name, parts in shares.items()}, per_item, examples,
                       example_graph, [udig_delta[i] for i in sorted(udig_delta)], dict(clock))


def _intervention_stage(model, chosen: list[SVAItem], subset: list[int], seed: int) -> dict[str, torch.Tensor]:
    """Mean ablation and activation patching of every head, q/k/v input and MLP on ``subset``
    (rows of ``chosen``): ``{truth: [len(subset), components]}``."""
    labels = component_labels(model)
    tokens_all, mask_all = to_tokens(model, [i.prefix for i in chosen])
    means = activation_means(model, tokens_all, mask_all)
    items = [chosen[i] for i in subset]
    tokens, mask_ = to_tokens(model, [i.prefix for i in items])
    cf_tokens, _ = to_tokens(model, [i.counterfactual for i in items])
    good, bad = _ids(items)
    effects = intervene(model, tokens, mask_, logit_diff(good, bad), counterfactual=cf_tokens, means=means,
                        kinds=PATHWAYS)
    return {truth: torch.stack([effects[truth][label] for label in labels], 1).double().cpu() for truth in TRUTHS}


def _component_rows(registry: Registry, labels: list[str], methods: dict, truths: dict) -> list[dict]:
    rows = []
    means = {m: importance(v[~torch.isnan(v).any(1)].numpy()) for m, v in methods.items()}
    effects = {t: importance(v.numpy()) for t, v in truths.items()}
    for c, label in enumerate(labels):
        component = registry.parse(label)
        row = dict(component=label, kind=COLUMN_KIND[component.kind], layer=component.layer)
        row.update({m: float(v[c]) for m, v in means.items()})
        row.update({t: float(v[c]) for t, v in effects.items()})
        rows.append(row)
    return rows


def _entropy_rows(per_item: list[dict]) -> list[dict]:
    """Mean path entropy (raw and divided by log N) and standard errors per condition and attractor count."""
    groups = defaultdict(list)
    for row in per_item:
        groups[(row["condition"], row["n_attractors"])].append(row)
    rows = []
    for (condition, n_attr), members in sorted(groups.items()):
        out = dict(condition=condition, n_attractors=n_attr, n=len(members))
        for key in ("path_entropy", "normalised_entropy", "log_paths"):
            values = [r[key] for r in members]
            mean = sum(values) / len(values)
            sd = math.sqrt(sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1))
            out[key], out[f"{key}_sem"] = mean, sd / math.sqrt(len(values))
        rows.append(out)
    return rows


def run(config: Config) -> Result:
    """Run the whole study (no files written)."""
    for name in ("limit", "intervention_items", "batch_size", "udig_steps", "head_sentences", "resamples"):
        value = getattr(config, name)
        if not (name == "intervention_items" and value is None) and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise GradGraphError(f"--{name.replace('_', '-')} must be a positive whole number, got {value!r}")
    intervened = min(INTERVENTION_ITEMS, config.limit) if config.intervention_items is None else config.intervention_items
    if intervened > config.limit:
        raise GradGraphError(f"--intervention-items {config.intervention_items} is more than the {config.limit} items "
                             f"analysed (--limit): the interventions run on some of those; choose at most {config.limit}")
    check_out(config.out)
    methods = check_methods(config.methods)
    start = time.time()
    model = load_model(config.model, device=config.device)
    registry, labels = Registry.of(model), component_labels(model)
    components = [registry.parse(label) for label in labels]
    items = sva_items(model.tokenizer, seed=config.seed, prepend_bos=model.cfg.default_prepend_bos)
    with_counterfactual = [i for i in items if i.counterfactual]
    if config.limit > len(with_counterfactual):
        raise GradGraphError(f"--limit {config.limit}: {config.model}'s tokenizer leaves {len(with_counterfactual)} "
                             f"items with a counterfactual of their own length; choose at most that")
    chosen = take(with_counterfactual, config.limit, seed=config.seed)
    results = evaluate_sva(model, items)
    accuracy = accuracy_table(results)
    print(f"\nSVA accuracy of {config.model} ({len(results)} items):\n{format_table(accuracy)}\n")
    subset_items = take(chosen, intervened, seed=config.seed + 1)
    subset = sorted(next(n for n, c in enumerate(chosen) if c is item) for item in subset_items)
    head_mask, heads_used = None, {}
    if "mask_lrp" in methods:
        corpus = head_types.default_corpus(model.tokenizer, config.head_sentences, seed=config.seed + 1)
        positional, syntactic = head_types.detect(model, corpus, 0.8, 0.1)
        head_mask = mask(model, "synt+pos", positional=positional, syntactic=syntactic)
        heads_used = dict(syntactic_or_positional=int(head_mask.sum()), of=int(head_mask.numel()))
    graphs = _graph_stage(model, chosen, set(subset), head_mask, config)
    truths = _intervention_stage(model, chosen, subset, config.seed)
    agreement_rows = []
    for method in methods:
        rows = graphs.methods[method][torch.tensor(subset)]
        for truth, name in TRUTHS.items():
            for row in agreement(rows, truths[truth], components, resamples=config.resamples, seed=config.seed):
                agreement_rows.append(dict(method=METHODS[method], key=method, truth=name, **row))
    subject = []
    for method in [m for m in TOKEN_METHODS if m in graphs.tokens]:
        for row in subject_wins(graphs.tokens[method], chosen):
            subject.append(dict(method=TOKEN_METHODS[method], key=method, **row))
    component_rows = _component_rows(registry, labels, graphs.methods, truths)
    tokens = [dict(prefix=item.prefix, tokens=[model.tokenizer.decode([t]) for t in
                                               to_tokens(model, item.prefix)[0][0].tolist()],
                   subject=item.subject_pos, attractors=list(item.attractor_pos), condition=item.condition,
                   scores={TOKEN_METHODS[m]: [None if math.isnan(v) else v for v in graphs.tokens[m][i].tolist()]
                           for m in graphs.tokens})
              for i, item in enumerate(chosen) if item.n_attractors > 0][:12]
    shares = graphs.shares
    summary = dict(
        model=config.model, items_evaluated=len(results), items_analysed=len(chosen), items_intervened=len(subset),
        methods=[METHODS[m] for m in methods], accuracy=accuracy, agreement=agreement_rows, subject_wins=subject,
        mask_lrp_heads=heads_used, udig_mean_abs_delta=(sum(abs(d) for d in graphs.udig_delta) / len(graphs.udig_delta)
                                                        if graphs.udig_delta else None),
        subject_last_layers={name: [dict(layer=layer, **{b: float(s.share[layer, i]) for i, b in enumerate(BRANCHES)})
                                    for layer in range(max(0, model.cfg.n_layers - 3), model.cfg.n_layers)]
                             for name, s in shares.items()},
        entropy=_entropy_rows(graphs.per_item), examples=graphs.examples, stage_seconds=graphs.seconds,
        seconds=time.time() - start)
    return Result(config, registry, labels, model.cfg.n_layers, model.cfg.n_heads, accuracy, graphs.methods, truths, subset,
                  agreement_rows, component_rows, subject, shares, summary["entropy"], graphs.per_item, graphs.examples,
                  graphs.graph, tokens, summary)


def _figures(result: Result, out, heat: dict) -> list[tuple[str, object]]:
    """``(file name, draw)`` for every figure the result has something to draw in; ``draw()`` writes it."""
    config, summary = result.config, result.summary
    n = len(result.intervened)
    spread = "95 % basic bootstrap intervals" if n >= MIN_ITEMS else f"no intervals: {n} items, they need {MIN_ITEMS}"
    shares = {SHARES[name.split("/")[1]]: s for name, s in result.shares.items() if name.startswith("subject/")}
    drawn = [
        ("sva_accuracy.png", lambda path: plot.sva_accuracy(
            result.accuracy, path, title=f"SVA accuracy, {config.model} ({summary['items_evaluated']} items)")),
        ("sva_agreement.png", lambda path: plot.agreement_plot(
            result.agreement, path, title=f"Agreement of each method with interventions ({n} items, {spread})")),
        ("sva_heads_by_method.png", lambda path: plot.head_heatmaps(
            {k: v.numpy() for k, v in heat.items()}, path, title="Mean |score| of each head's output, by method")),
        ("sva_branch_shares.png", lambda path: plot.branch_shares_plot(
            shares, path, title="q/k/v/skip shares at the subject token's attention inputs")) if shares else None,
        ("sva_subject_wins.png", lambda path: plot.subject_wins_plot(
            result.subject, path, title="How often the subject outweighs every attractor, by method"))
        if result.subject else None,
        ("sva_entropy.png", lambda path: plot.entropy_plot(result.entropy, path,
                                                           title="Path entropy of the gradient graph")),
    ]
    if result.examples:
        first = result.examples[0]
        drawn.append(("sva_top_paths.png", lambda path: plot.circuit_plot(
            [(tuple(p["components"]), p["weight"], p["scalar_paths"]) for p in first["from_subject"]],
            first["tokens"], path, registry=result.registry,
            title=f"Best component paths from the subject: {first['prefix']!r} → {first['good']!r} vs {first['bad']!r}")))
    if result.graph is not None:
        flows = nx.DiGraph([(e["source"], e["target"], dict(weight=e["values"]["flow"])) for e in result.graph["edges"]
                            if e["values"].get("flow") is not None])
        drawn.append(("sva_component_graph.png", lambda path: plot.component_graph_plot(
            flows, result.graph["tokens"], path, registry=result.registry,
            title=f"|gradient| flow between components: {result.graph['prefix']!r} → {result.graph['good']!r} "
                  f"vs {result.graph['bad']!r}")))
    return [(name, lambda draw=draw, name=name: draw(out.figure(name))) for name, draw in filter(None, drawn)]


def _component_graph_files(result: Result, out) -> None:
    """The example's component graph as GraphML, node-link JSON and circuit-tracer's format."""
    cg = nx.DiGraph()
    for edge in result.graph["edges"]:
        cg.add_edge(edge["source"], edge["target"], **{k: v for k, v in edge["values"].items() if v is not None})
    nx.write_graphml(cg, out.path("component_graph.graphml"))
    out.path("component_graph.json").write_text(json.dumps(result.graph, indent=1))
    slug = "gradgraph-sva"
    tracer = circuit_tracer_graph(result.graph, slug=slug, model=result.config.model, registry=result.registry)
    out.path(f"circuit-tracer/{slug}.json").write_text(json.dumps(tracer, indent=1))
    out.path("circuit-tracer/graph-metadata.json").write_text(json.dumps({"graphs": [tracer["metadata"]]}, indent=1))


def write(result: Result) -> dict:
    """Save what was computed, then stage every table, figure, the reports and the component graph
    (each on its own: one that fails is reported and the rest are written) and publish them together."""
    config, summary = result.config, dict(result.summary)
    figures = config.figures or str(Path(config.out) / "figures")
    with staged_run(config.out, figures, COMMAND) as out:
        out.save(result)
        tables = dict(accuracy=result.accuracy, agreement=result.agreement, components=result.components,
                      subject_wins=result.subject, entropy=result.entropy, items=result.per_item,
                      branch_shares=[dict(where=name.split("/")[0], method=SHARES.get(name.split("/")[1], name), **row)
                                     for name, s in result.shares.items() for row in s.rows() if row["head"] == "all"])
        for name, rows in tables.items():
            out.make(f"{name}.csv", lambda rows=rows, name=name: write_csv(out.path(f"{name}.csv"), rows))
        out.make("examples.json", lambda: out.path("examples.json").write_text(json.dumps(result.examples, indent=1)))
        heat = out.make("the head heatmaps' values", lambda: _heat(result)) or {}
        made = [f for f in (out.make(name, draw) for name, draw in _figures(result, out, heat)) if f is not None]
        if result.graph is not None:
            out.make("the component graph (GraphML, JSON, circuit-tracer)", lambda: _component_graph_files(result, out))
        summary["figures"] = [str(out.final(f)) for f in made]
        out.make("summary.json", lambda: out.path("summary.json").write_text(json.dumps(summary, indent=1, default=str)))
        text = out.make("report.md", lambda: markdown(summary, result))
        if text is not None:
            out.path("report.md").write_text(text)
        figure_links = {Path(f).name: relative_link(out.final(f), Path(config.out)) for f in made}
        out.make("report.html", lambda: out.path("report.html").write_text(
            report.sva_page(summary, result, heat, figure_links)))
        if text is not None:
            print(text)
    print(f"\nReport: {Path(config.out) / 'report.html'} (open it in a browser; it needs no network)")
    return summary


def _heat(result: Result) -> dict[str, torch.Tensor]:
    """Mean |score| of every head's output ``[layers, heads]`` per method and intervention."""
    heat = {METHODS[m]: head_grid(result.registry, result.labels, torch.tensor(importance(v[~torch.isnan(v).any(1)].numpy())))
            for m, v in result.methods.items()}
    heat.update({name: head_grid(result.registry, result.labels, torch.tensor(importance(result.truths[t].numpy())))
                 for t, name in TRUTHS.items()})
    return heat


def main(config: Config) -> dict:
    """Run the study and write its results (``gradgraph sva``)."""
    return write(run(config))


def redraw(out: str, figures: str | None = None) -> dict:
    """Draw the tables, figures and reports of the run saved in ``out`` again, without the model
    (``gradgraph sva --redraw OUT``); figures go to ``figures`` (default ``OUT/figures``)."""
    result = load(out, command=COMMAND)
    result.config.out, result.config.figures = str(out), figures
    return write(result)


def markdown(summary: dict, result: Result) -> str:
    """A short markdown report stating the findings in numbers."""
    overall = next(r for r in summary["accuracy"] if r["condition"] == "all")
    lines = [f"# Subject–verb agreement in {summary['model']}", "",
             f"- Accuracy (good verb's logit above the bad one's): **{overall['accuracy']:.3f}** over {overall['n']} items.",
             f"- Graph methods on {summary['items_analysed']} items; interventions (and UDIG) on "
             f"{summary['items_intervened']}.", ""]
    note = intervals_note(summary["agreement"])
    lines += ["## Agreement with interventions (Spearman ρ of mean |score| with mean |effect|, "
              + (f"{note})" if note else "95 % basic bootstrap interval)"), "",
              "| method | ground truth | heads | q/k/v inputs | MLPs | all | top-10 overlap (heads) |",
              "|---|---|---|---|---|---|---|"]
    by = defaultdict(dict)
    for r in summary["agreement"]:
        by[(r["method"], r["truth"])][r["group"]] = r
    for (method, truth), groups in by.items():
        cells = [cell(g) if g else "" for g in (groups.get(k) for k in ("heads", "q/k/v inputs", "MLPs", "all"))]
        heads = groups.get("heads")
        overlap = cell(heads, "overlap", digits=1) if heads else ""
        lines.append(f"| {method} | {truth} | " + " | ".join(cells) + f" | {overlap} |")
    lines += ["", "## The subject against the attractors (share of items where |attribution| of the subject "
              "exceeds every attractor's)", "", "| method | condition | attractors | n | subject wins |",
              "|---|---|---|---|---|"]
    if not summary["subject_wins"]:
        lines.append("| (no analysed item has an attractor) | | | | |")
    for r in summary["subject_wins"]:
        lines.append(f"| {r['method']} | {r['condition']} | {r['n_attractors'] if r['n_attractors'] is not None else 'any'} "
                     f"| {r['n']} | {r['subject_wins']:.2f} |")
    lines += ["", "## q/k/v/skip shares at the subject token, last layers", "",
              "| method | layer | q | k | v | skip |", "|---|---|---|---|---|---|"]
    for name, rows in summary["subject_last_layers"].items():
        if name.startswith("subject/"):
            for r in rows:
                lines.append(f"| {SHARES[name.split('/')[1]]} | {r['layer']} | {r['q']:.3f} | {r['k']:.3f} | "
                             f"{r['v']:.3f} | {r['skip']:.3f} |")
    lines += ["", "Du et al. (2023): 76 % of the subject's top-path gradient in a 6-layer BERT's last layer runs "
              "through the keys.", "", "## Path entropy", "",
              "| condition | attractors | n | entropy (nats) | entropy / log N | log N |", "|---|---|---|---|---|---|"]
    for r in summary["entropy"]:
        lines.append(f"| {r['condition']} | {r['n_attractors']} | {r['n']} | {r['path_entropy']:.2f} ± "
                     f"{r['path_entropy_sem']:.2f} | {r['normalised_entropy']:.3f} ± {r['normalised_entropy_sem']:.3f} | "
                     f"{r['log_paths']:.1f} |")
    lines += ["", "## Best component paths from the subject", ""]
    for ex in summary["examples"]:
        lines.append(f"- {ex['prefix']!r} → {ex['good']!r} (vs {ex['bad']!r}), subject at {ex['subject']}:")
        for p in ex["from_subject"]:
            lines.append(f"  - {p['weight']:+.3g}: {' → '.join(p['components'])}")
    if summary.get("udig_mean_abs_delta") is not None:
        lines += ["", f"UDIG's completeness error |Σ attribution − (F(x) − F(x′))|: mean "
                      f"{summary['udig_mean_abs_delta']:.3f} over {summary['items_intervened']} items."]
    lines += ["", f"Run time: {summary['seconds']:.0f} s. Interactive report: report.html.", ""]
    return "\n".join(lines)
