"""Which heads are positional and which syntactic (``gradgraph head-types``): Mask-LRP's head
detection (``gradgraph.heads``) over a corpus, as a table and a layer × head figure.

Config → run → write. The default corpus is what the project ships: Rotten Tomatoes sentences
(a seed apart from the ones ``lrp-eval`` explains) and SVA sentences.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gradgraph import plot
from gradgraph.arch.models import load_model
from gradgraph.data.sentiment import rotten_tomatoes
from gradgraph.data.sva import sva_items
from gradgraph.errors import GradGraphError
from gradgraph.heads import RELATIONS, positional_heads, syntactic_heads
from gradgraph.prompts import read_prompts
from gradgraph.studies.output import staged_run, write_csv
from gradgraph.studies.saved import load

COMMAND = "gradgraph head-types"


@dataclass
class Config:
    corpus: str | None = None  # text file, one sentence per line (default: the shipped corpus)
    sentences: int = 200  # of the shipped corpus: half Rotten Tomatoes, half SVA sentences
    threshold: float = 0.8  # ξ_pos
    margin: float = 0.1  # ξ_synt: a relation's threshold is its fixed-offset baseline plus this
    model: str = "smollm2-135m"
    device: str = "auto"  # where the model runs: auto (a GPU when torch sees one, else the CPU), cpu, cuda, cuda:N, mps
    out: str = "results/head-types"
    figures: str = "results/head-types/figures"


def default_corpus(tokenizer, n: int, seed: int = 1) -> list[str]:
    """``n`` sentences: Rotten Tomatoes (seed 1; ``lrp-eval`` explains seed 0's) and SVA items
    completed with their correct verb."""
    reviews = [r.text for r in rotten_tomatoes(n - n // 2, seed=seed, max_words=30)]
    items = sva_items(tokenizer, seed=seed)[: n // 2]
    return reviews + [f"{item.prefix}{item.good} here." for item in items]


def detect(model, corpus: list[str], threshold: float, margin: float) -> tuple[list[dict], list[dict]]:
    """(positional rows, syntactic rows) of ``gradgraph.heads``."""
    return positional_heads(model, corpus, threshold), syntactic_heads(model, corpus, margin=margin)


def run(config: Config, model=None) -> tuple[list[dict], list[dict], list[str]]:
    if isinstance(config.sentences, bool) or not isinstance(config.sentences, int) or config.sentences < 1:
        raise GradGraphError(f"--sentences must be a positive whole number, got {config.sentences!r}")
    for name in ("threshold", "margin"):
        if not 0 <= getattr(config, name) <= 1:
            raise GradGraphError(f"--{name} must lie in [0, 1], got {getattr(config, name)}")
    corpus = read_prompts(config.corpus) if config.corpus else None  # a bad file is refused before the model loads
    model = model or load_model(config.model, device=config.device)
    corpus = corpus or default_corpus(model.tokenizer, config.sentences)
    positional, syntactic = detect(model, corpus, config.threshold, config.margin)
    return positional, syntactic, corpus


def table(positional: list[dict], syntactic: list[dict]) -> list[dict]:
    """One row per head: its positional offset and share, and its accuracy per relation."""
    rows = []
    for p in positional:
        row = dict(layer=p["layer"], head=p["head"], label=f"L{p['layer']}H{p['head']}", offset=p["offset"],
                   offset_share=round(p["share"], 4), positional=p["positional"])
        mine = [s for s in syntactic if (s["layer"], s["head"]) == (p["layer"], p["head"])]
        for s in mine:
            row[f"{s['relation']}_accuracy"] = round(s["accuracy"], 4)
        row["syntactic"] = ",".join(s["relation"] for s in mine if s["syntactic"])
        rows.append(row)
    return rows


def figure(rows: list[dict], path, *, title: str):
    """The layer × head figure of ``table`` rows (the relations that have an accuracy column)."""
    return plot.head_types(rows, [r for r in RELATIONS if f"{r}_accuracy" in rows[0]], path, title=title)


def write(config: Config, positional: list[dict], syntactic: list[dict], corpus: list[str]) -> list[dict]:
    """Save what was computed; stage the tables and the figure (each on its own) and publish them;
    print the heads found."""
    rows = table(positional, syntactic)
    with staged_run(config.out, config.figures, COMMAND) as out:
        out.save(dict(config=config, positional=positional, syntactic=syntactic, corpus=corpus))
        out.make("head_types.csv", lambda: write_csv(out.path("head_types.csv"), rows))
        thresholds = {s["relation"]: dict(baseline=s["baseline"], threshold=s["threshold"], arcs=s["arcs"])
                      for s in syntactic}
        out.make("thresholds.csv", lambda: out.path("thresholds.csv").write_text(
            "relation,arcs,baseline,threshold\n" + "".join(
                f"{rel},{v['arcs']},{v['baseline']:.4f},{v['threshold']:.4f}\n" for rel, v in thresholds.items())))
        out.make("head_types.png", lambda: figure(rows, out.figure("head_types.png"),
                                                  title=f"Head types, {config.model} ({len(corpus)} sentences)"))
        pos = [r["label"] + f" (+{r['offset']})" for r in rows if r["positional"]]
        syn = [r["label"] + f" ({r['syntactic']})" for r in rows if r["syntactic"]]
        print(f"positional heads ({len(pos)}): " + (", ".join(pos) or "none"))
        print(f"syntactic heads ({len(syn)}): " + (", ".join(syn) or "none"))
    print(f"wrote {config.out}/head_types.csv, thresholds.csv and {config.figures}/head_types.png")
    return rows


def main(config: Config) -> list[dict]:
    return write(config, *run(config))


def redraw(out: str, figures: str | None = None) -> list[dict]:
    """Write the table and the figure of the run saved in ``out`` again, without the model
    (``gradgraph head-types --redraw OUT``); the figure goes to ``figures`` (default ``OUT/figures``)."""
    saved = load(out, command=COMMAND)
    config = saved["config"]
    config.out, config.figures = str(out), figures or str(Path(out) / "figures")
    return write(config, saved["positional"], saved["syntactic"], saved["corpus"])
