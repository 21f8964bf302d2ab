"""Judging a model on SVA items: does it give the agreeing verb the higher logit?"""

from __future__ import annotations

import random
from collections import defaultdict

import torch
from tqdm.auto import tqdm

from gradgraph.arch.lens import Model
from gradgraph.data.sva import SVAItem
from gradgraph.errors import GradGraphError
from gradgraph.metrics import logit_diff
from gradgraph.prompts import to_tokens


def take(items: list[SVAItem], limit: int | None, *, seed: int = 0) -> list[SVAItem]:
    """At most ``limit`` items, drawn evenly across (condition, n_attractors, number) cells."""
    if limit is None:
        return list(items)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise GradGraphError(f"--limit must be a positive number of items, got {limit!r}")
    cells: dict[tuple, list[SVAItem]] = defaultdict(list)
    for item in items:
        cells[(item.condition, item.n_attractors, item.subject_number)].append(item)
    rng = random.Random(seed)
    queues = [rng.sample(group, len(group)) for _, group in sorted(cells.items())]
    chosen: list[SVAItem] = []
    while len(chosen) < min(limit, len(items)):
        for queue in queues:
            if queue and len(chosen) < limit:
                chosen.append(queue.pop())
    return chosen


@torch.no_grad()
def evaluate_sva(
    model: Model, items: list[SVAItem], *, batch_size: int = 32, progress: bool = True
) -> list[dict]:
    """Per-item results: the logit difference good − bad at the last prefix token, and correctness."""
    if not items:
        raise GradGraphError("no SVA items to evaluate; check --limit and the tokenizer")
    results = []
    batches = range(0, len(items), batch_size)
    for start in tqdm(batches, desc="sva-eval", unit="batch", disable=not progress):
        chunk = items[start : start + batch_size]
        tokens, mask = to_tokens(model, [item.prefix for item in chunk])
        if tokens.shape[1] != max(item.n_tokens for item in chunk):
            raise GradGraphError("item token counts disagree with the model's tokenizer; regenerate the items")
        metric = logit_diff(torch.tensor([i.good_id for i in chunk]), torch.tensor([i.bad_id for i in chunk]))
        diffs = metric(model(tokens), mask)
        for item, diff in zip(chunk, diffs.tolist()):
            results.append(
                dict(
                    prefix=item.prefix,
                    good=item.good,
                    bad=item.bad,
                    condition=item.condition,
                    n_attractors=item.n_attractors,
                    subject_number=item.subject_number,
                    logit_diff=diff,
                    correct=diff > 0,
                )
            )
    return results


def accuracy_table(results: list[dict]) -> list[dict]:
    """Rows ``{condition, n_attractors, n, accuracy, mean_logit_diff}`` plus an ``all`` row."""
    groups: dict[tuple[str, int | str], list[dict]] = defaultdict(list)
    for row in results:
        groups[(row["condition"], row["n_attractors"])].append(row)
    groups[("all", "all")] = list(results)
    order = ["simple", "pp", "src", "orc", "all"]
    table = []
    for (condition, n_attr), rows in sorted(
        groups.items(), key=lambda kv: (order.index(kv[0][0]) if kv[0][0] in order else 9, str(kv[0][1]))
    ):
        table.append(
            dict(
                condition=condition,
                n_attractors=n_attr,
                n=len(rows),
                accuracy=sum(r["correct"] for r in rows) / len(rows),
                mean_logit_diff=sum(r["logit_diff"] for r in rows) / len(rows),
            )
        )
    return table


def format_table(table: list[dict]) -> str:
    lines = [f"{'condition':<10} {'attractors':>10} {'n':>5} {'accuracy':>9} {'mean diff':>10}"]
    for row in table:
        lines.append(
            f"{row['condition']:<10} {str(row['n_attractors']):>10} {row['n']:>5} "
            f"{row['accuracy']:>9.3f} {row['mean_logit_diff']:>+10.3f}"
        )
    return "\n".join(lines)
