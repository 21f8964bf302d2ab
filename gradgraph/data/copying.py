"""A copying (induction) task with counterfactuals: a list of words and its repetition, cut where the
next word is the one that followed in the first copy (the induction pattern of Olsson et al. 2022;
the repeated-sequence task of the induction-head circuit studies).

" apple river lamp cloud horse stone apple river lamp" → " cloud". The counterfactual changes that
one word in the first copy (" apple river lamp bread horse stone apple river lamp" → " bread"), so a
model that copies answers the other word; the metric is ``logit(word) − logit(other word)`` at the
last position. Every word is one token with its leading space, so that a prompt and its
counterfactual align token by token.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from gradgraph.errors import GradGraphError

WORDS = ("apple", "river", "lamp", "cloud", "horse", "stone", "bread", "chair", "garden", "window", "music",
         "paper", "forest", "bottle", "letter", "mountain", "coffee", "engine", "silver", "winter", "doctor",
         "island", "pencil", "rabbit", "bridge", "candle", "mirror", "orange", "pocket", "hammer", "ladder",
         "jacket", "planet", "rocket", "tiger", "violin", "wallet", "basket", "button", "castle", "dragon",
         "feather", "glove", "helmet", "kitten", "lemon", "market", "needle", "ocean", "pillow", "queen",
         "ribbon", "saddle", "tunnel", "umbrella", "valley", "wheel", "yellow", "zebra", "anchor", "blanket",
         "carpet", "desert", "eagle", "flower", "guitar", "honey", "iron", "jungle", "kettle", "monkey")


@dataclass(frozen=True)
class CopyItem:
    prompt: str
    counterfactual: str
    good: str  # " cloud": the word that followed in the first copy (with its space)
    bad: str  # " bread": the word that followed in the counterfactual's
    length: int  # words in the list
    copied: int  # words of it repeated before the cut


def copying_items(tokenizer, n: int = 100, *, length: int = 6, seed: int = 0) -> list[CopyItem]:
    """``n`` items of ``length`` distinct one-token words, each repeated up to a cut drawn between
    the first and the second-to-last word."""
    if tokenizer is None:
        raise GradGraphError("copying items need the model's tokenizer (to keep one-token words); this model has none")
    if not isinstance(n, int) or n < 1:
        raise GradGraphError(f"n must be a positive number of items, got {n!r}")
    if not isinstance(length, int) or length < 3:
        raise GradGraphError(f"length must be at least 3 words, got {length!r}")
    words = [w for w in WORDS if len(tokenizer.encode(" " + w, add_special_tokens=False)) == 1]
    if len(words) < length + 1:
        raise GradGraphError(f"the tokenizer keeps {len(words)} of the copying words as one token; "
                             f"{length + 1} are needed")
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        *listed, other = rng.sample(words, length + 1)
        cut = rng.randrange(1, length - 1)  # the answer is listed[cut], after listed[:cut] repeated
        changed = listed[:cut] + [other] + listed[cut + 1:]
        prompt = "".join(" " + w for w in listed + listed[:cut])  # each word its own spaced token
        counterfactual = "".join(" " + w for w in changed + listed[:cut])
        items.append(CopyItem(prompt, counterfactual, " " + listed[cut], " " + other, length, cut))
    return items


__all__ = ["CopyItem", "WORDS", "copying_items"]
