"""Input attributions measured (``gradgraph attr-eval``): saliency, gradient × input, SmoothGrad,
IG, DIG and UDIG (greedy and maxcount) and LAFA on Rotten Tomatoes and on SVA items.

Config → run → write. Rotten Tomatoes items are the few-shot prompts of ``gradgraph.data.sentiment``
with only the review's tokens attributed (the prompt around them keeps its tokens on every path);
SVA items attribute the prefix after BOS. Quantity: logit(gold label) − logit(the other label);
baseline: the pad token's embedding (DIG's). Faithfulness by ``gradgraph.faithfulness.measure``:
log-odds, comprehensiveness and sufficiency at the top 20 % (DIG's and UDIG's conventions, on the
predicted label) and AOPC over 10 %…90 % replaced (Mask-LRP's, shared with ``lrp-eval``). Every row
also has the mean |completeness delta| and the seconds per example.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from gradgraph import plot
from gradgraph.arch.models import load_model
from gradgraph.attribution import attribute
from gradgraph.data.sentiment import sentiment_items
from gradgraph.errors import GradGraphError
from gradgraph.faithfulness import LEVELS, Example, deletion_scores, measure
from gradgraph.metrics import logit_diff
from gradgraph.neighbours import vocabulary_neighbours
from gradgraph.studies.lrp_eval import sva_examples
from gradgraph.studies.output import staged_run, write_csv
from gradgraph.studies.saved import load

COMMAND = "gradgraph attr-eval"
METRICS = ("log_odds", "comprehensiveness", "sufficiency", "aopc")


@dataclass
class Config:
    sentences: int = 12  # Rotten Tomatoes sentences (each about 1.8 min on 2 cores for all nine methods)
    sva_items: int = 32
    corpus: int = 48  # reference texts for LAFA (disjoint from the evaluated items)
    steps: int = 30  # IG steps + 2 (so that IG and DIG/UDIG use the same number of points), DIG/UDIG anchors m
    samples: int = 16  # SmoothGrad
    max_words: int = 20
    seed: int = 0
    model: str = "smollm2-135m"
    device: str = "auto"  # where the model runs: auto (a GPU when torch sees one, else the CPU), cpu, cuda, cuda:N, mps
    out: str = "results/attr-eval"
    figures: str = "results/attr-eval/figures"


def methods(config: Config) -> dict[str, dict]:
    """Display name → ``attribute`` options."""
    m = config.steps
    out = {"saliency": dict(method="saliency"), "gradient × input": dict(method="grad_x_input"),
           "SmoothGrad": dict(method="smoothgrad", samples=config.samples),
           "IG": dict(method="ig", steps=m + 2)}
    for method in ("dig", "udig"):
        for strategy in ("greedy", "maxcount"):
            out[f"{method.upper()} ({strategy})"] = dict(method=method, strategy=strategy, steps=m)
    out["LAFA (gradient × input)"] = dict(method="lafa", base="grad_x_input")
    return out


def _rt(model, config: Config) -> tuple[list[Example], list[str]]:
    items = sentiment_items(model.tokenizer, config.sentences + config.corpus, seed=config.seed,
                            max_words=config.max_words, prepend_bos=model.cfg.default_prepend_bos)
    examples = [Example(i.tokens, i.review_positions, i.good_id, i.bad_id) for i in items[: config.sentences]]
    return examples, [i.prompt for i in items[config.sentences:]]


def _sva(model, config: Config) -> tuple[list[Example], list[str]]:
    examples, items = sva_examples(model, config.sva_items + config.corpus, config.seed)
    return examples[: config.sva_items], [i.prefix for i in items[config.sva_items:]]


def evaluate(model, name: str, examples: list[Example], corpus: list[str], config: Config, pad_id: int) -> dict:
    """Every method on one dataset: the metric rows, accuracy, and the first item's token scores."""
    options = methods(config)
    results: dict[str, list[dict]] = {m: [] for m in options}
    deltas: dict[str, list[float]] = {m: [] for m in options}
    clock = dict.fromkeys(options, 0.0)
    correct, first = 0, None
    for example in tqdm(examples, desc=f"attr-eval {name}", unit="item"):
        metric = logit_diff(example.good, example.bad)
        scores = {}
        for method, opts in options.items():
            extra = dict(corpus=corpus) if opts["method"] == "lafa" else {}
            start = time.perf_counter()
            result = attribute(model, torch.tensor([example.tokens]), metric, positions=example.candidates,
                               **opts, **extra)
            clock[method] += time.perf_counter() - start
            scores[method] = result.scores[0]
            deltas[method].append(abs(float(result.delta[0])))
        measured = measure(model, example, scores, pad_id)
        for method, m in measured.items():
            results[method].append(m)
        correct += measured[next(iter(measured))]["p"] > 0.5
        if first is None:
            first = dict(tokens=list(example.tokens), candidates=list(example.candidates),
                         scores={m: s.tolist() for m, s in scores.items()})
    rows = []
    for method, values in results.items():
        p = torch.tensor([v["p"] for v in values], dtype=torch.float64)
        levels = torch.stack([v["levels"] for v in values])
        rows.append(dict(dataset=name, method=method, n=len(values),
                         log_odds=sum(v["log_odds"] for v in values) / len(values),
                         comprehensiveness=sum(v["comprehensiveness"] for v in values) / len(values),
                         sufficiency=sum(v["sufficiency"] for v in values) / len(values),
                         aopc=deletion_scores(p, levels)["aopc"],
                         mean_abs_delta=sum(deltas[method]) / len(values),
                         seconds_per_example=clock[method] / len(values)))
    return dict(rows=rows, accuracy=correct / len(examples), n=len(examples), first=first)


def run(config: Config) -> dict:
    for field in ("sentences", "sva_items", "corpus", "steps", "samples"):
        if getattr(config, field) < 1:
            raise GradGraphError(f"{field} must be a positive number, got {getattr(config, field)}")
    started = time.time()
    model = load_model(config.model, device=config.device)
    pad_id = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    begin = time.perf_counter()
    vocabulary_neighbours(model)  # DIG's KNN graph: built once per model, then read from the cache
    knn_seconds = time.perf_counter() - begin
    results = {}
    for name, make in (("Rotten Tomatoes", _rt), ("SVA", _sva)):
        examples, corpus = make(model, config)
        results[name] = evaluate(model, name, examples, corpus, config, pad_id)
    for data in results.values():
        data["first"]["words"] = [model.tokenizer.decode([t]) for t in data["first"]["tokens"]]
    return dict(config=asdict(config), results=results, knn_seconds=knn_seconds, seconds=time.time() - started)


def _markdown(rows: list[dict]) -> str:
    lines = ["| dataset | method | n | log-odds ↓ | comp ↑ | suff ↓ | AOPC ↑ | mean abs delta | s / example |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['method']} | {r['n']} | {r['log_odds']:.4f} | {r['comprehensiveness']:.4f} "
                     f"| {r['sufficiency']:.4f} | {r['aopc']:.4f} | {r['mean_abs_delta']:.3f} | "
                     f"{r['seconds_per_example']:.2f} |")
    return "\n".join(lines)


def write(config: Config, result: dict) -> list[dict]:
    """Save what was computed; stage the tables and figures (each on its own) and publish them; print
    the evaluation."""
    rows = [r for data in result["results"].values() for r in data["rows"]]
    with staged_run(config.out, config.figures, COMMAND) as out:
        out.save(dict(config=config, result=result))
        out.make("evaluation.csv", lambda: write_csv(out.path("evaluation.csv"), rows, list(rows[0])))
        out.make("evaluation.md", lambda: out.path("evaluation.md").write_text(_markdown(rows) + "\n"))
        out.make("summary.json", lambda: out.path("summary.json").write_text(json.dumps(result, indent=1, default=str)))
        out.make("attr_eval_metrics.png", lambda: plot.metric_bars(
            rows, METRICS, out.figure("attr_eval_metrics.png"),
            title=f"Faithfulness of input attributions ({config.model}; top 20 %, AOPC over "
                  f"{int(100 * LEVELS[0])}–{int(100 * LEVELS[-1])} %)"))
        for dataset, data in result["results"].items():
            first = data["first"]
            shown = slice(first["candidates"][0], None)  # the attributed text and what follows it
            name = f"attr_eval_tokens_{dataset.split()[0].lower()}.png"
            out.make(name, lambda name=name, first=first, shown=shown, dataset=dataset: plot.token_scores(
                first["words"][shown], {m: s[shown] for m, s in first["scores"].items()}, out.figure(name),
                title=f"Token attributions by method: {dataset}"))
        print(_markdown(rows))
        for name, data in result["results"].items():
            print(f"{name}: accuracy {data['accuracy']:.3f} on {data['n']} items")
        print(f"DIG's KNN graph: {result['knn_seconds']:.1f} s (built or read); {result['seconds']:.0f} s; "
              f"wrote {config.out}")
    return rows


def main(config: Config) -> dict:
    result = run(config)
    write(config, result)
    return result


def redraw(out: str, figures: str | None = None) -> list[dict]:
    """Write the tables and figures of the run saved in ``out`` again, without the model
    (``gradgraph attr-eval --redraw OUT``); figures go to ``figures`` (default ``OUT/figures``)."""
    saved = load(out, command=COMMAND)
    config = saved["config"]
    config.out, config.figures = str(out), figures or str(Path(out) / "figures")
    return write(config, saved["result"])
