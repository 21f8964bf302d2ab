"""LRP, Mask-LRP and their baselines, measured by deletion (``gradgraph lrp-eval``).

Config → run → write. Two datasets: Rotten Tomatoes sentences classified by the embedded model
with a two-example prompt (``gradgraph.data.sentiment``; quantity logit(gold label) − logit(other
label)), and SVA items (logit(correct verb) − logit(wrong verb)). For each item every method scores
the candidate tokens (the review; the SVA prefix after BOS) from **one recorded forward pass**
assembled under each rule set and head mask; then AOPC and log-odds after replacing the top
10 %…90 % of candidates with the pad token (``gradgraph.faithfulness``; Mask-LRP's protocol).

Methods: raw attention (last layer), attention rollout, gradient × input, LRP under each rule set
(input relevance), partial LRP (last layer, Chefer's rules), Chefer et al.'s rollout, and Mask-LRP
(the rollout with relevance through the synt / pos / synt+pos / random heads only; heads from
``gradgraph head-types`` on a corpus disjoint from the evaluated sentences).

Also Relevance Patching: on SVA items with an aligned counterfactual (the subject's number
flipped), Pearson r of RelP and of attribution patching against activation patching of the residual
stream, attention outputs and MLP outputs, position by position.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from gradgraph import plot
from gradgraph.arch import names
from gradgraph.arch.models import load_model
from gradgraph.attribution import (attention_rollout, cached_relevance, chefer_rollout, partial_lrp, raw_attention,
                                   token_scores)
from gradgraph.backprop import backprop
from gradgraph.build import after_prefix, assemble, record
from gradgraph.data.sentiment import sentiment_items
from gradgraph.data.sva import sva_items
from gradgraph.errors import GradGraphError
from gradgraph.faithfulness import LEVELS, Example, deletion_scores, measure_all
from gradgraph.heads import mask
from gradgraph.interventions import patch_positions, relevance_patching
from gradgraph.metrics import logit_diff
from gradgraph.prompts import right_pad
from gradgraph.rules import ATTN_LRP, CHEFER2021, CP_LRP, GRADIENT, RELP
from gradgraph.studies import head_types
from gradgraph.studies.output import staged_run, write_csv
from gradgraph.studies.saved import load

COMMAND = "gradgraph lrp-eval"
LRP_RULES = (ATTN_LRP, CP_LRP, RELP, CHEFER2021)
MASKS = ("synt", "pos", "synt+pos", "random")


@dataclass
class Config:
    sentences: int = 200  # Rotten Tomatoes sentences
    sva_items: int = 200
    relp_items: int = 24  # SVA items for the relevance-patching comparison (activation patching is costly)
    head_sentences: int = 200  # corpus for head detection (disjoint from the evaluated sentences)
    max_words: int = 20
    graph_tokens: int = 600  # padded tokens per gradient graph (items of similar length batched together)
    seed: int = 0
    model: str = "smollm2-135m"
    device: str = "auto"  # where the model runs: auto (a GPU when torch sees one, else the CPU), cpu, cuda, cuda:N, mps
    out: str = "results/lrp-eval"
    figures: str = "results/lrp-eval/figures"


def rt_examples(model, config: Config) -> list[Example]:
    items = sentiment_items(model.tokenizer, config.sentences, seed=config.seed, max_words=config.max_words,
                            prepend_bos=model.cfg.default_prepend_bos)
    return [Example(i.tokens, i.review_positions, i.good_id, i.bad_id) for i in items]


def sva_examples(model, n: int, seed: int) -> tuple[list[Example], list]:
    items = sva_items(model.tokenizer, seed=seed, prepend_bos=model.cfg.default_prepend_bos)
    items = [items[i] for i in torch.randperm(len(items), generator=torch.Generator().manual_seed(seed))[:n].tolist()]
    bos = [model.tokenizer.bos_token_id] if model.cfg.default_prepend_bos else []
    out = []
    for item in items:
        ids = tuple(bos + model.tokenizer.encode(item.prefix, add_special_tokens=False))
        out.append(Example(ids, tuple(range(len(bos), len(ids))), item.good_id, item.bad_id))
    return out, items


def _input_relevance(graph) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token Σ activation ⊙ modified gradient at the inputs ``[batch, pos]``, and Σ − metric
    (the inputs: the tokens, and a cached prefix's keys and values where the graph follows one)."""
    grads = backprop(graph, keep=list(graph.sources) + list(graph.cached))
    scores = token_scores(graph, grads)
    return scores, scores.sum(1) + cached_relevance(graph, grads) - graph.metric_value


def _padded(scores: torch.Tensor, prefix: int) -> torch.Tensor:
    """Scores of the positions after a prefix ``[batch, pos]`` → of every position (0 in the prefix)."""
    return torch.cat([scores.new_zeros(scores.shape[0], prefix), scores], 1)


def score_batch(model, examples: list[Example], masks: dict[str, torch.Tensor], clock: dict[str, float],
                prefix: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    """Every method's token scores ``{method: [batch, pos]}`` from one recording, the LRP
    conservation errors ``{rules: [batch]}`` and the metric ``[batch]``; ``clock`` adds seconds per
    method. With ``prefix``, every example starts with those tokens (a few-shot prompt) and the
    methods whose rules are positionwise run on the graph after it (``build.after_prefix``): the
    same scores for the tokens after it, from a graph a fraction of the size; Chefer et al.'s rules
    normalise over the whole sequence and run on the whole graph."""
    tokens, attention_mask = right_pad([e.tokens for e in examples])
    metric = logit_diff(torch.tensor([e.good for e in examples]), torch.tensor([e.bad for e in examples]))
    start = time.perf_counter()
    recording = record(model, tokens, metric, attention_mask=attention_mask)
    local = after_prefix(recording, prefix) if prefix else recording
    clock["(recording)"] = clock.get("(recording)", 0.0) + time.perf_counter() - start
    scores, deltas = {}, {}

    def timed(name, make):
        begin = time.perf_counter()
        value = make()
        clock[name] = clock.get(name, 0.0) + time.perf_counter() - begin
        return value

    gradient = timed("gradient × input", lambda: assemble(local, GRADIENT))
    patterns = [names.name("pattern", layer) for layer in range(model.cfg.n_layers)]
    grads = timed("gradient × input", lambda: backprop(gradient, keep=list(patterns) + list(gradient.sources)))
    scores["gradient × input"] = _padded(token_scores(gradient, grads), prefix)
    scores["raw attention"] = _padded(timed("raw attention", lambda: raw_attention(gradient).scores), prefix)
    scores["attention rollout"] = _padded(timed("attention rollout", lambda: attention_rollout(gradient).scores), prefix)
    for rules in LRP_RULES:
        name = f"LRP ({rules.name})"
        source = local if rules.positionwise else recording
        graph = timed(name, lambda: assemble(source, rules))
        relevance, deltas[rules.name] = timed(name, lambda: _input_relevance(graph))
        scores[name] = _padded(relevance, graph.prefix)
        if rules is CHEFER2021:
            scores["partial LRP"] = timed("partial LRP", lambda: partial_lrp(graph).scores)
            scores["Chefer rollout"] = _padded(timed("Chefer rollout", lambda: chefer_rollout(
                gradient, graph, gradients=grads).scores), prefix)
    for kind, head_mask in masks.items():
        name = f"Mask-LRP ({kind})"
        graph = timed(name, lambda: assemble(recording, CHEFER2021, head_mask=head_mask))
        scores[name] = _padded(timed(name, lambda: chefer_rollout(gradient, graph, gradients=grads).scores), prefix)
    return scores, deltas, recording.metric_value


def _batches(examples: list[Example], tokens: int) -> list[list[int]]:
    """Indices of ``examples`` in batches of similar length, each at most ``tokens`` padded tokens
    (and at least one example)."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].tokens))
    batches, current = [], []
    for i in order:
        if current and (len(current) + 1) * len(examples[i].tokens) > tokens:
            batches.append(current)
            current = []
        current.append(i)
    return batches + [current] if current else batches


def evaluate(model, name: str, examples: list[Example], masks: dict[str, torch.Tensor], graph_tokens: int,
             pad_id: int, *, shared_prefix: bool = False) -> dict:
    """Deletion metrics of every method on one dataset, accuracy, conservation and timings.
    ``shared_prefix``: every example starts with the same prompt, up to its first candidate."""
    prefix = min(min(e.candidates) for e in examples) if shared_prefix else 0
    scored: list[dict[str, torch.Tensor] | None] = [None] * len(examples)
    deltas: dict[str, torch.Tensor] = {}  # rules -> [n]
    metric = torch.zeros(len(examples), dtype=torch.float64)
    clock: dict[str, float] = {}
    for batch in tqdm(_batches(examples, graph_tokens), desc=f"lrp-eval {name}", unit="batch"):
        chunk = [examples[i] for i in batch]
        scores, batch_deltas, value = score_batch(model, chunk, masks, clock, prefix)
        metric[batch] = value.double().cpu()
        for rules, d in batch_deltas.items():
            deltas.setdefault(rules, torch.zeros(len(examples), dtype=torch.float64))[batch] = d.double().cpu()
        for row, i in enumerate(batch):
            scored[i] = {m: s[row, : len(examples[i].tokens)] for m, s in scores.items()}
    curves: dict[str, list[torch.Tensor]] = {}
    begin = time.perf_counter()
    step = 32  # examples whose deletion rows run together (rows of one length share passes)
    for start in tqdm(range(0, len(examples), step), desc=f"deletion {name}", unit="chunk"):
        part = slice(start, start + step)
        for by_method in measure_all(model, examples[part], scored[part], pad_id, top=None):
            for method, m in by_method.items():
                curves.setdefault(method, []).append(torch.cat([torch.tensor([m["p"]], dtype=torch.float64), m["levels"]]))
    clock["(deletion)"] = time.perf_counter() - begin
    n = len(examples)
    rows = []
    for method, values in curves.items():
        p = torch.stack(values)  # [n, 1 + levels]
        row = dict(dataset=name, method=method, n=n, **deletion_scores(p[:, 0], p[:, 1:]),
                   seconds_per_example=clock[method] / n if method in clock else None)
        rows.append(row)
    conservation = {rules: dict(mean_abs_delta=float(d.abs().mean()),
                                median_abs_relative=float((d.abs() / metric.abs().clamp(min=1e-6)).median()))
                    for rules, d in deltas.items()}
    shown = max(range(len(examples)), key=lambda i: len(examples[i].tokens))  # the longest item, for the token figure
    return dict(rows=rows, accuracy=float((metric > 0).double().mean()), n=n, conservation=conservation,
                seconds={k: v / n for k, v in clock.items()}, first={m: s.tolist() for m, s in scored[shown].items()},
                first_tokens=list(examples[shown].tokens), prefix=prefix)


def relp_report(model, items, n: int, batch_size: int) -> list[dict]:
    """Pearson r of RelP and attribution patching against activation patching, per site."""
    bos = [model.tokenizer.bos_token_id] if model.cfg.default_prepend_bos else []
    pairs = []
    for item in items:
        clean = bos + model.tokenizer.encode(item.prefix, add_special_tokens=False)
        flipped = bos + model.tokenizer.encode(item.counterfactual, add_special_tokens=False)
        if len(clean) == len(flipped):
            pairs.append((clean, flipped, item))
        if len(pairs) == n:
            break
    if not pairs:
        raise GradGraphError("no SVA item has a counterfactual of its own length")
    pairs.sort(key=lambda pair: len(pair[0]))  # batches of one length: patching costs grow with length²
    actual, estimates = {}, {}
    for start in tqdm(range(0, len(pairs), batch_size), desc="relevance patching", unit="batch"):
        chunk = pairs[start:start + batch_size]
        tokens, attention_mask = right_pad([c for c, _, _ in chunk])
        flipped, _ = right_pad([f for _, f, _ in chunk])
        metric = logit_diff(torch.tensor([it.good_id for _, _, it in chunk]), torch.tensor([it.bad_id for _, _, it in chunk]))
        truth = patch_positions(model, tokens, attention_mask, flipped, metric, progress=False)
        first = relevance_patching(model, tokens, attention_mask, flipped, metric)
        real = attention_mask.bool()[:, None, :].expand(-1, model.cfg.n_layers, -1)
        for site, value in truth.items():
            actual.setdefault(site, []).append(value[real])
            for method in ("relp", "attribution"):
                estimates.setdefault((site, method), []).append(first[method][site][real])
    rows = []
    for (site, method), values in estimates.items():
        x, y = torch.cat(values), torch.cat(actual[site])
        r = float(torch.corrcoef(torch.stack([x, y]))[0, 1])
        rows.append(dict(site=site, estimate="relevance patching (RelP)" if method == "relp" else "attribution patching",
                         pearson_r=r, points=len(x), items=len(pairs)))
    return rows


def run(config: Config) -> dict:
    for field in ("sentences", "sva_items", "graph_tokens", "head_sentences"):
        if getattr(config, field) < 1:
            raise GradGraphError(f"{field} must be a positive number, got {getattr(config, field)}")
    if config.relp_items > config.sva_items:
        raise GradGraphError(f"--relp-items {config.relp_items} is more than the {config.sva_items} SVA items "
                             f"(--sva-items): relevance patching runs on some of those; choose at most {config.sva_items}")
    started = time.time()
    model = load_model(config.model, device=config.device)
    pad_id = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    corpus = head_types.default_corpus(model.tokenizer, config.head_sentences, seed=config.seed + 1)
    positional, syntactic = head_types.detect(model, corpus, 0.8, 0.1)
    masks = {kind: mask(model, kind, positional=positional, syntactic=syntactic, seed=config.seed) for kind in MASKS}
    rt = evaluate(model, "Rotten Tomatoes", rt_examples(model, config), masks, config.graph_tokens, pad_id,
                  shared_prefix=True)
    sva, items = sva_examples(model, config.sva_items, config.seed)
    sva_result = evaluate(model, "SVA", sva, masks, config.graph_tokens, pad_id)
    relp = relp_report(model, items, config.relp_items, 8) if config.relp_items else []
    for data in (rt, sva_result):
        data["first_words"] = [model.tokenizer.decode([t]) for t in data["first_tokens"]]
    return dict(config=asdict(config), results={"Rotten Tomatoes": rt, "SVA": sva_result}, relp=relp,
                heads=head_types.table(positional, syntactic), masks={k: int(v.sum()) for k, v in masks.items()},
                seconds=time.time() - started)


def _markdown(rows: list[dict]) -> str:
    lines = ["| dataset | method | n | AOPC ↑ | log-odds ↓ | s / example |", "|---|---|---|---|---|---|"]
    for r in rows:
        seconds = "" if r["seconds_per_example"] is None else f"{r['seconds_per_example']:.3f}"
        lines.append(f"| {r['dataset']} | {r['method']} | {r['n']} | {r['aopc']:.4f} | {r['log_odds']:.4f} | {seconds} |")
    return "\n".join(lines)


def write(config: Config, result: dict) -> list[dict]:
    """Save what was computed; stage the tables and figures (each on its own) and publish them; print
    the evaluation."""
    rows = [r for dataset in result["results"].values() for r in dataset["rows"]]
    with staged_run(config.out, config.figures, COMMAND) as out:
        out.save(dict(config=config, result=result))
        out.make("evaluation.csv", lambda: write_csv(out.path("evaluation.csv"), rows, [
            "dataset", "method", "n", "aopc", "log_odds", "seconds_per_example"]))
        out.make("evaluation.md", lambda: out.path("evaluation.md").write_text(_markdown(rows) + "\n"))
        out.make("relp.csv", lambda: write_csv(out.path("relp.csv"), result["relp"]))
        out.make("head_types.csv", lambda: write_csv(out.path("head_types.csv"), result["heads"]))
        summary = {k: v for k, v in result.items() if k not in ("heads",)}
        out.make("summary.json", lambda: out.path("summary.json").write_text(json.dumps(summary, indent=1, default=str)))
        for key, label in (("aopc_by_level", "AOPC"), ("log_odds_by_level", "log-odds")):
            name = f"lrp_eval_{label.lower()}.png"
            curves = {dataset: {r["method"]: r[key] for r in data["rows"]} for dataset, data in result["results"].items()}
            out.make(name, lambda name=name, curves=curves, label=label: plot.deletion_curves(
                curves, LEVELS, out.figure(name), metric=label,
                title=f"{label} after replacing the top-ranked tokens ({config.model})"))
        for dataset, data in result["results"].items():
            name = f"lrp_eval_tokens_{dataset.split()[0].lower()}.png"
            keep = slice(-24, None)  # the review and the question, not the few-shot examples
            out.make(name, lambda name=name, data=data, dataset=dataset: plot.token_scores(
                data["first_words"][keep], {m: s[keep] for m, s in data["first"].items()}, out.figure(name),
                title=f"Token scores by method: {dataset}"))
        out.make("head_types.png", lambda: head_types.figure(result["heads"], out.figure("head_types.png"),
                                                            title=f"Head types used by Mask-LRP ({config.model})"))
        print(_markdown(rows))
        for name, data in result["results"].items():
            print(f"{name}: accuracy {data['accuracy']:.3f} on {data['n']} items; conservation (median |Σ R − f| / |f|): "
                  + ", ".join(f"{k} {v['median_abs_relative']:.3g}" for k, v in data["conservation"].items()))
        for r in result["relp"]:
            print(f"{r['site']:<10} {r['estimate']:<28} Pearson r = {r['pearson_r']:.3f} ({r['points']} points, "
                  f"{r['items']} items)")
        print(f"masks: {result['masks']} heads; {result['seconds']:.0f} s; wrote {config.out}")
    return rows


def main(config: Config) -> dict:
    result = run(config)
    write(config, result)
    return result


def redraw(out: str, figures: str | None = None) -> list[dict]:
    """Write the tables and figures of the run saved in ``out`` again, without the model
    (``gradgraph lrp-eval --redraw OUT``); figures go to ``figures`` (default ``OUT/figures``)."""
    saved = load(out, command=COMMAND)
    config = saved["config"]
    config.out, config.figures = str(out), figures or str(Path(out) / "figures")
    return write(config, saved["result"])
