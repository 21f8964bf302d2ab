"""Tests for the subject-verb agreement item generator (gradgraph.data.sva)."""

from collections import Counter

import pytest

from gradgraph.data import SVAItem, sva_items
from gradgraph.data.sva import CELLS, NOUNS
from gradgraph.errors import GradGraphError

SG = {sg for sg, _ in NOUNS}
PL = {pl for _, pl in NOUNS}


@pytest.fixture(scope="module")
def items(smol_tokenizer) -> list[SVAItem]:
    return sva_items(smol_tokenizer, seed=0)


def _ids(tok, text: str) -> list[int]:
    return [tok.bos_token_id] + tok.encode(text, add_special_tokens=False)


def _text_through(tok, item: SVAItem, pos: int) -> str:
    """Decoded prefix text up to and including token `pos`, checked to end at a word boundary."""
    ids = _ids(tok, item.prefix)
    text = tok.decode(ids[1 : pos + 1])
    assert item.prefix.startswith(text), (item.prefix, text)
    rest = item.prefix[len(text) :]
    assert rest == "" or rest.startswith(" "), (item.prefix, text)
    return text


def test_count_and_distinct(items):
    assert len(items) >= 600
    assert len({(it.prefix, it.good) for it in items}) == len(items)


def test_every_cell_present_and_balanced(items):
    cells = Counter((it.condition, it.n_attractors) for it in items)
    assert set(cells) == set(CELLS)
    assert len(set(cells.values())) == 1  # equal cell sizes
    numbers = Counter((it.condition, it.n_attractors, it.subject_number) for it in items)
    for condition, n_att in CELLS:
        assert numbers[(condition, n_att, "sg")] == numbers[(condition, n_att, "pl")] > 0


def test_deterministic_per_seed(smol_tokenizer, items):
    assert sva_items(smol_tokenizer, seed=0) == items
    other = sva_items(smol_tokenizer, seed=1)
    assert len(other) == len(items)
    assert {(it.prefix, it.good) for it in other} != {(it.prefix, it.good) for it in items}


def test_max_per_cell(smol_tokenizer):
    small = sva_items(smol_tokenizer, max_per_cell=10)
    assert Counter((it.condition, it.n_attractors) for it in small) == {cell: 10 for cell in CELLS}


def test_verb_ids_are_single_tokens(smol_tokenizer, items):
    survived = set()
    for it in items:
        assert smol_tokenizer.encode(it.good, add_special_tokens=False) == [it.good_id]
        assert smol_tokenizer.encode(it.bad, add_special_tokens=False) == [it.bad_id]
        assert smol_tokenizer.decode([it.good_id]) == it.good
        assert smol_tokenizer.decode([it.bad_id]) == it.bad
        assert it.good != it.bad
        survived.add(frozenset((it.good, it.bad)))
    assert frozenset((" is", " are")) in survived
    assert len(survived) >= 5


def test_good_verb_agrees_with_subject(items):
    for it in items:
        singular_form = it.good if it.subject_number == "sg" else it.bad
        assert singular_form in {" is", " was", " has"} or singular_form.endswith("s")


def test_n_tokens(smol_tokenizer, items):
    for it in items:
        assert it.n_tokens == len(_ids(smol_tokenizer, it.prefix))


def test_subject_pos_points_at_subject(smol_tokenizer, items):
    for it in items:
        text = _text_through(smol_tokenizer, it, it.subject_pos)
        words = text.split(" ")
        assert words[0] == "The" and len(words) in (2, 3), text
        assert words[-1] in (SG if it.subject_number == "sg" else PL), text


def test_attractors_point_at_other_number_nouns(smol_tokenizer, items):
    for it in items:
        assert it.n_attractors == len(it.attractor_pos)
        assert list(it.attractor_pos) == sorted(set(it.attractor_pos))
        other = PL if it.subject_number == "sg" else SG
        for pos in it.attractor_pos:
            assert it.subject_pos < pos < it.n_tokens
            word = _text_through(smol_tokenizer, it, pos).split(" ")[-1]
            assert word in other, (it.prefix, word)
        # Every other-number noun after the subject is counted as an attractor.
        subject_words = len(_text_through(smol_tokenizer, it, it.subject_pos).split(" "))
        later = it.prefix.split(" ")[subject_words:]
        assert sum(w in other for w in later) == it.n_attractors, it.prefix


def test_counterfactual_flips_only_the_subject(smol_tokenizer, items):
    flip = {sg: pl for sg, pl in NOUNS} | {pl: sg for sg, pl in NOUNS}
    assert all(it.counterfactual for it in items)  # SmolLM2 nouns keep their token count
    for it in items:
        assert len(_ids(smol_tokenizer, it.counterfactual)) == it.n_tokens
        a, b = it.prefix.split(" "), it.counterfactual.split(" ")
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        assert len(a) == len(b) and len(diff) == 1, (it.prefix, it.counterfactual)
        subject_words = len(_text_through(smol_tokenizer, it, it.subject_pos).split(" "))
        assert diff == [subject_words - 1]
        assert b[diff[0]] == flip[a[diff[0]]]


def test_no_bos_shifts_positions(smol_tokenizer, items):
    plain = sva_items(smol_tokenizer, seed=0, prepend_bos=False)
    assert [it.prefix for it in plain] == [it.prefix for it in items]
    for a, b in zip(plain, items):
        assert a.subject_pos == b.subject_pos - 1
        assert a.attractor_pos == tuple(p - 1 for p in b.attractor_pos)
        assert a.n_tokens == b.n_tokens - 1


def test_errors():
    with pytest.raises(GradGraphError, match="tokenizer"):
        sva_items(None)
    with pytest.raises(GradGraphError, match="tokenizer"):
        sva_items(object())

    class CharTokenizer:
        bos_token_id = None

        def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
            return [ord(c) for c in text]

    with pytest.raises(GradGraphError, match="verb pair"):
        sva_items(CharTokenizer())
