"""Subject-verb agreement (SVA) items in the style of Marvin & Linzen (2018).

Each item is a sentence prefix that stops right before the main verb, plus the
correct and the wrong verb form (" is"/" are", " likes"/" like", ...). The
model should prefer the form that agrees with the subject's number, even when
nouns of the other number (attractors) stand between subject and verb.

Templates (all vocabulary is written here; nothing is downloaded):

- ``simple``: "The {subj}" or "The {adj} {subj}"; no attractor.
- ``pp``: across prepositional phrases, "The {subj} {prep} the {n1}" and
  "The {subj} {prep} the {n1} {prep} the {n2}".
- ``src``: across a subject relative clause, "The {subj} that {verb_past} the {n1}"
  and "The {subj} that {verb_past} the {n1} {prep} the {n2}".
- ``orc``: across an object relative clause, "The {subj} that the {n1} {verb_past}"
  and "The {subj} that the {n1} {prep} the {n2} {verb_past}".

Past-tense verbs do not inflect for number, so the relative clauses are
grammatical for both numbers. An attractor is a noun among n1/n2 whose number
differs from the subject's; items are grouped into cells (condition, number of
attractors): simple/0, pp/0-2, src/0-2, orc/0-2, with singular and plural
subjects exactly balanced in every cell.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from gradgraph.errors import GradGraphError

# (singular, plural) nouns for people: they can be the agents of verbs.
PEOPLE: tuple[tuple[str, str], ...] = (
    ("author", "authors"), ("doctor", "doctors"), ("teacher", "teachers"),
    ("student", "students"), ("farmer", "farmers"), ("pilot", "pilots"),
    ("senator", "senators"), ("manager", "managers"), ("officer", "officers"),
    ("guard", "guards"), ("painter", "painters"), ("lawyer", "lawyers"),
    ("surgeon", "surgeons"), ("dancer", "dancers"), ("singer", "singers"),
    ("boy", "boys"), ("girl", "girls"), ("woman", "women"), ("man", "men"),
    ("child", "children"), ("friend", "friends"), ("neighbor", "neighbors"),
    ("customer", "customers"), ("driver", "drivers"), ("actor", "actors"),
    ("chef", "chefs"), ("nurse", "nurses"), ("engineer", "engineers"),
    ("architect", "architects"),
)
# (singular, plural) nouns for things.
THINGS: tuple[tuple[str, str], ...] = (
    ("key", "keys"), ("cabinet", "cabinets"), ("picture", "pictures"),
    ("table", "tables"), ("window", "windows"), ("book", "books"),
    ("house", "houses"), ("car", "cars"), ("bottle", "bottles"),
    ("letter", "letters"), ("box", "boxes"), ("door", "doors"), ("chair", "chairs"),
)
NOUNS: tuple[tuple[str, str], ...] = PEOPLE + THINGS

ADJ_PERSON: tuple[str, ...] = ("old", "young", "tall", "quiet", "famous")
ADJ_THING: tuple[str, ...] = ("old", "new", "small", "large")

# (preposition, object is a person) options after a person head / after a thing head.
PREPS_PERSON: tuple[tuple[str, bool], ...] = tuple(
    (prep, person) for prep in ("near", "behind", "next to", "beside", "with") for person in (True, False)
)
PREPS_THING: tuple[tuple[str, bool], ...] = (
    ("near", False), ("behind", False), ("next to", False), ("beside", False), ("on", False),
    ("above", False), ("to", False), ("of", True), ("from", True),
)

# Past-tense transitive verbs: any object / a person object only.
VERBS_PAST_ANY: tuple[str, ...] = ("liked", "saw", "admired", "hated", "watched", "described", "found")
VERBS_PAST_PERSON: tuple[str, ...] = ("met", "visited", "helped", "called", "praised", "thanked", "trusted")

# (singular, plural) main-verb forms with a leading space.
VERBS_ANY: tuple[tuple[str, str], ...] = (
    (" is", " are"), (" was", " were"), (" has", " have"), (" seems", " seem"),
    (" looks", " look"), (" needs", " need"), (" remains", " remain"), (" appears", " appear"),
)
VERBS_PERSON: tuple[tuple[str, str], ...] = (
    (" likes", " like"), (" wants", " want"), (" lives", " live"), (" works", " work"), (" knows", " know"),
)
VERBS_THING: tuple[tuple[str, str], ...] = (
    (" belongs", " belong"), (" stands", " stand"), (" sits", " sit"),
)

CELLS: tuple[tuple[str, int], ...] = (
    ("simple", 0), ("pp", 0), ("pp", 1), ("pp", 2), ("src", 0), ("src", 1), ("src", 2),
    ("orc", 0), ("orc", 1), ("orc", 2),
)
DEFAULT_PER_CELL = 80


@dataclass(frozen=True)
class SVAItem:
    """One agreement item; token positions index the sequence the model sees."""

    prefix: str
    good: str
    bad: str
    good_id: int
    bad_id: int
    subject_pos: int
    attractor_pos: tuple[int, ...]
    n_attractors: int
    condition: str
    subject_number: str
    counterfactual: str
    n_tokens: int


def _single_token(tokenizer: Any, text: str) -> int | None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


def _draw(
    rng: random.Random, condition: str, n_att: int, subj_pl: bool
) -> tuple[list[str], int, list[tuple[int, bool]], tuple[str, str], bool]:
    """Draw one sentence.

    Returns its words, the subject's word index, (word index, is attractor) for
    each other noun, the subject's (sg, pl) pair and whether the subject is a person.
    """
    if condition == "simple":
        n_nouns = 0
    elif n_att == 2:
        n_nouns = 2
    else:
        n_nouns = rng.choice((1, 2))
    other = [True] * n_att + [False] * (n_nouns - n_att)  # which nouns take the other number
    rng.shuffle(other)
    used: list[tuple[str, str]] = []

    def pick(person: bool, plural: bool) -> str:
        pair = rng.choice([p for p in (PEOPLE if person else THINGS) if p not in used])
        used.append(pair)
        return pair[1] if plural else pair[0]

    subj_person = condition == "src" or rng.random() < 0.6
    words = ["The"]
    if condition == "simple" and rng.random() < 0.5:
        words.append(rng.choice(ADJ_PERSON if subj_person else ADJ_THING))
    subj_idx = len(words)
    words.append(pick(subj_person, subj_pl))
    nouns: list[tuple[int, bool]] = []

    def add_noun(person: bool, k: int) -> bool:
        words.append("the")
        nouns.append((len(words), other[k]))
        words.append(pick(person, subj_pl != other[k]))
        return person

    def add_pp(head_person: bool, k: int) -> bool:
        prep, person = rng.choice(PREPS_PERSON if head_person else PREPS_THING)
        words.extend(prep.split())
        return add_noun(person, k)

    if condition == "pp":
        n1_person = add_pp(subj_person, 0)
        if n_nouns == 2:
            add_pp(n1_person, 1)
    elif condition == "src":
        verb = rng.choice(VERBS_PAST_ANY + VERBS_PAST_PERSON)
        words.extend(["that", verb])
        n1_person = add_noun(verb in VERBS_PAST_PERSON or rng.random() < 0.5, 0)
        if n_nouns == 2:
            add_pp(n1_person, 1)
    elif condition == "orc":
        words.append("that")
        add_noun(True, 0)
        if n_nouns == 2:
            add_pp(True, 1)
        words.append(rng.choice(VERBS_PAST_ANY + VERBS_PAST_PERSON if subj_person else VERBS_PAST_ANY))
    return words, subj_idx, nouns, used[0], subj_person


def _word_ends(tokenizer: Any, words: list[str]) -> list[int] | None:
    """Token count of each word prefix; None if incremental tokenization is not a prefix of the full one."""
    full = tokenizer.encode(" ".join(words), add_special_tokens=False)
    ends = []
    for i in range(1, len(words) + 1):
        ids = tokenizer.encode(" ".join(words[:i]), add_special_tokens=False)
        if ids != full[: len(ids)]:
            return None
        ends.append(len(ids))
    return ends


def sva_items(
    tokenizer: Any,
    *,
    seed: int = 0,
    prepend_bos: bool = True,
    max_per_cell: int | None = None,
) -> list[SVAItem]:
    """Build balanced SVA items for ``tokenizer``, deterministic for a ``seed``.

    Every cell of ``CELLS`` gets ``max_per_cell`` items (default 80; rounded down
    to an even number), half with singular and half with plural subjects, as far
    as distinct items can be found. Verb pairs whose forms are not single tokens
    are dropped. Positions index ``[bos] + encode(prefix)`` when ``prepend_bos``
    and the tokenizer has a BOS token, else ``encode(prefix)``; a multi-token
    noun's position is that of its last token.
    """
    if tokenizer is None or not callable(getattr(tokenizer, "encode", None)):
        raise GradGraphError(
            f"sva_items needs a Hugging Face tokenizer (model.tokenizer), got {type(tokenizer).__name__}; "
            "tiny random models have none: load a pretrained model or pass its tokenizer."
        )
    per_cell = DEFAULT_PER_CELL if max_per_cell is None else max_per_cell
    if per_cell < 2:
        raise GradGraphError(f"max_per_cell must be at least 2 (one singular, one plural item), got {max_per_cell}.")
    per_number = per_cell // 2

    verb_ids: dict[tuple[str, str], tuple[int, int]] = {}
    for pair in VERBS_ANY + VERBS_PERSON + VERBS_THING:
        sg_id, pl_id = _single_token(tokenizer, pair[0]), _single_token(tokenizer, pair[1])
        if sg_id is not None and pl_id is not None:
            verb_ids[pair] = (sg_id, pl_id)
    if len(verb_ids) < 2:
        raise GradGraphError(
            f"only {len(verb_ids)} verb pair(s) have single-token forms for this tokenizer; "
            "sva_items needs at least 2: use a tokenizer with word-level tokens for ' is'/' are' etc."
        )
    person_verbs = [p for p in VERBS_ANY + VERBS_PERSON if p in verb_ids]
    thing_verbs = [p for p in VERBS_ANY + VERBS_THING if p in verb_ids]
    offset = 1 if prepend_bos and getattr(tokenizer, "bos_token_id", None) is not None else 0

    rng = random.Random(seed)
    seen: set[tuple[str, str]] = set()
    items: list[SVAItem] = []
    for condition, n_att in CELLS:
        counts = {False: 0, True: 0}
        attempts = 0
        while min(counts.values()) < per_number and attempts < 200 * per_cell:
            attempts += 1
            subj_pl = counts[False] > counts[True]  # alternate sg / pl
            if counts[subj_pl] >= per_number:
                subj_pl = not subj_pl
            words, subj_idx, nouns, subj_pair, subj_person = _draw(rng, condition, n_att, subj_pl)
            verbs = person_verbs if subj_person else thing_verbs
            if not verbs:
                continue
            pair = rng.choice(verbs)
            good, bad = (pair[1], pair[0]) if subj_pl else pair
            prefix = " ".join(words)
            if (prefix, good) in seen:
                continue
            ends = _word_ends(tokenizer, words)
            if ends is None:
                continue
            cf_words = list(words)
            cf_words[subj_idx] = subj_pair[0] if subj_pl else subj_pair[1]
            cf = " ".join(cf_words)
            cf_same = len(tokenizer.encode(cf, add_special_tokens=False)) == ends[-1]
            sg_id, pl_id = verb_ids[pair]
            attractors = tuple(offset + ends[i] - 1 for i, is_att in nouns if is_att)
            seen.add((prefix, good))
            counts[subj_pl] += 1
            items.append(SVAItem(
                prefix=prefix,
                good=good,
                bad=bad,
                good_id=pl_id if subj_pl else sg_id,
                bad_id=sg_id if subj_pl else pl_id,
                subject_pos=offset + ends[subj_idx] - 1,
                attractor_pos=attractors,
                n_attractors=len(attractors),
                condition=condition,
                subject_number="pl" if subj_pl else "sg",
                counterfactual=cf if cf_same else "",
                n_tokens=offset + ends[-1],
            ))
        # Keep the cell exactly balanced if one number ran short.
        excess = counts[True] - counts[False]
        if excess:
            drop_pl = excess > 0
            for _ in range(abs(excess)):
                for j in range(len(items) - 1, -1, -1):
                    if (items[j].subject_number == "pl") == drop_pl:
                        del items[j]
                        break
    return items
