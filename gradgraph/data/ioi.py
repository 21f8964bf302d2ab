"""Indirect-object identification (IOI; Wang et al. 2023) items with ABC counterfactuals, generated here.

A prompt names two people, repeats one of them (the subject, S) and stops where the other (the
indirect object, IO) is the answer: "When Mary and John went to the store, John gave a drink to" →
" Mary". Both orders of the first two names (ABBA and BABA) are drawn equally. The counterfactual is
the same sentence with three other names, all distinct ("When Alice and Bob went to the store, Carol
gave a drink to"), the ABC corruption of Conmy et al. (2023) and MIB: no name in it points to the
clean IO. The metric is ``logit(IO) − logit(S)`` at the last position.

Names, places and objects are kept only where the tokenizer makes each one token (with its leading
space), so that a prompt and its counterfactual align token by token. (A template SmolLM2-135M
gets wrong on most items, "Friends {A} and {B} found a {object} at the {place}. {S} gave it to",
1 in 6, is left out.)
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from gradgraph.errors import GradGraphError

NAMES = ("Mary", "John", "Alice", "Bob", "Tom", "James", "Sarah", "Kate", "Anna", "David", "Michael", "Emma",
         "Lisa", "Paul", "Mark", "Peter", "Laura", "Susan", "Daniel", "Jack", "Lucy", "Rose", "Grace", "Henry",
         "Sam", "Max", "Ben", "Amy", "Jane", "Mike", "Chris", "Steve", "Linda", "Nancy", "Karen", "George",
         "Frank", "Helen", "Ruth", "Carl", "Eric", "Adam", "Ryan", "Jason", "Kevin", "Brian", "Emily", "Olivia")
PLACES = ("store", "park", "school", "office", "beach", "hospital", "restaurant", "library", "station",
          "garden", "museum", "market", "church", "bank", "airport", "hotel", "theater", "farm")
OBJECTS = ("drink", "book", "ring", "gift", "bag", "letter", "key", "ball", "flower", "cake", "bottle", "pen",
           "phone", "map", "ticket", "hat", "coin", "card", "toy", "apple")
# {A} {B}: the first two names, {S}: the repeated one; each name preceded by a space in the text
TEMPLATES = (
    "When {A} and {B} went to the {place}, {S} gave a {object} to",
    "After {A} and {B} went to the {place}, {S} gave a {object} to",
    "When {A} and {B} got a {object} at the {place}, {S} decided to give it to",
    "While {A} and {B} were working at the {place}, {S} gave a {object} to",
    "Then, {A} and {B} had a long argument, and afterwards {S} said to",
    "When {A} and {B} arrived at the {place}, {S} handed the {object} to",
    "The {place} {A} and {B} went to had a {object}. {S} gave it to",
)


@dataclass(frozen=True)
class IOIItem:
    prompt: str
    counterfactual: str
    io: str  # " Mary": the answer (with its space)
    s: str  # " John": the repeated name
    template: int
    order: str  # "ABBA" (IO first) or "BABA"


def _single(tokenizer, words) -> list[str]:
    return [w for w in words if len(tokenizer.encode(" " + w, add_special_tokens=False)) == 1]


def ioi_items(tokenizer, n: int = 100, *, seed: int = 0) -> list[IOIItem]:
    """``n`` IOI items (templates, orders and words drawn with ``seed``) whose names, places and
    objects are single tokens for ``tokenizer``."""
    if tokenizer is None:
        raise GradGraphError("IOI items need the model's tokenizer (to keep one-token names); this model has none")
    if not isinstance(n, int) or n < 1:
        raise GradGraphError(f"n must be a positive number of items, got {n!r}")
    names, places, objects = _single(tokenizer, NAMES), _single(tokenizer, PLACES), _single(tokenizer, OBJECTS)
    if len(names) < 5 or not places or not objects:
        raise GradGraphError(f"the tokenizer splits too many of the IOI words: {len(names)} one-token names "
                             f"(5 needed), {len(places)} places, {len(objects)} objects")
    rng = random.Random(seed)
    items = []
    for i in range(n):
        template = i % len(TEMPLATES)
        io, s, a, b, c = rng.sample(names, 5)
        order = "ABBA" if i % 2 == 0 else "BABA"
        first, second = (io, s) if order == "ABBA" else (s, io)
        place, obj = rng.choice(places), rng.choice(objects)
        text = TEMPLATES[template]
        prompt = text.format(A=first, B=second, S=s, place=place, object=obj)
        counterfactual = text.format(A=a, B=b, S=c, place=place, object=obj)
        items.append(IOIItem(prompt, counterfactual, " " + io, " " + s, template, order))
    return items


__all__ = ["IOIItem", "ioi_items", "NAMES", "OBJECTS", "PLACES", "TEMPLATES"]
