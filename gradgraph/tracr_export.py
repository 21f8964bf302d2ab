"""Compile RASP programs to transformers with tracr (Lindner et al. 2023) and write their weights.

Runs in the tracr environment only (``make tracr``: ``.venv-tracr``, JAX and tracr, kept out of the
main install): ``.venv-tracr/bin/python gradgraph/tracr_export.py OUT_DIR``. It imports neither
torch nor gradgraph. For each program it writes ``NAME.npz`` (the weights, float64 copies of
tracr's float32 ones, and the unembedding onto the program's output space) and ``NAME.json`` (the
config, the residual stream's basis labels, the vocabulary's and the output's encodings, every
input of the longest length and tracr's own final residual and output on each, to check a loaded
model against). ``gradgraph.tracr_models``
loads them as ``HookedTransformer``s.

The programs are causal (every selector looks at the current or earlier positions), so that the
compiled model is a causal decoder: the fraction of tokens so far that are ``x`` (ACDC's
``xproportion``, numerical), the previous token, the token two back (two attention layers in
series) and whether the two previous tokens are equal (two heads in one layer and an MLP).
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import numpy as np
from tracr.compiler import compiling
from tracr.rasp import rasp

BOS = "BOS"
VOCAB = {"a", "b", "c", "x"}
MAX_SEQ_LEN = 5


def _shift(sop, by: int, name: str):
    """``sop`` at the position ``by`` before (tracr's ``shift_by``): one attention head."""
    select = rasp.Select(rasp.indices, rasp.indices, lambda key, query: query == key + by).named(f"{name}_select")
    return rasp.Aggregate(select, sop, default=None).named(name)


def frac_prevs():
    is_x = rasp.numerical(rasp.Map(lambda t: 1 if t == "x" else 0, rasp.tokens)).named("is_x")
    prevs = rasp.Select(rasp.indices, rasp.indices, rasp.Comparison.LEQ).named("prevs")
    return rasp.numerical(rasp.Aggregate(prevs, is_x, default=0)).named("frac_prevs")


def prev_token():
    return _shift(rasp.tokens, 1, "prev_token")


def two_back():
    return _shift(_shift(rasp.tokens, 1, "prev_token"), 1, "two_back")


def prev_pair_equal():
    one, two = _shift(rasp.tokens, 1, "prev_token"), _shift(rasp.tokens, 2, "two_before")
    return rasp.SequenceMap(lambda a, b: a == b and a is not None, one, two).named("prev_pair_equal")


PROGRAMS = dict(frac_prevs=frac_prevs, prev_token=prev_token, two_back=two_back, prev_pair_equal=prev_pair_equal)


def _unembedding(model, program, labels: list[str]) -> tuple[np.ndarray, list]:
    """``W_U [d_model, classes]`` onto the program's output space and each class's value: one class
    per value of a categorical output; a numerical output is class 0 beside a constant 0 (class 1),
    so that ``logit(0) − logit(1)`` is its value."""
    name = program.label
    if rasp.is_numerical(program):
        W = np.zeros((len(labels), 2))
        W[labels.index(name), 0] = 1.0
        return W, ["value", "zero"]
    decoding = {index: value for value, index in model.output_encoder.encoding_map.items()}  # class → value
    W = np.zeros((len(labels), len(decoding)))
    for index, value in decoding.items():
        W[labels.index(f"{name}:{value}"), index] = 1.0
    return W, [decoding[i] for i in range(len(decoding))]


def export(name: str, out: Path) -> None:
    program = PROGRAMS[name]()
    model = compiling.compile_rasp_to_model(program, vocab=VOCAB, max_seq_len=MAX_SEQ_LEN, causal=True,
                                            compiler_bos=BOS)
    cfg, params = model.model_config, model.params
    labels = list(model.residual_labels)
    arrays = dict(W_E=np.asarray(params["token_embed"]["embeddings"]), W_pos=np.asarray(params["pos_embed"]["embeddings"]))
    for layer in range(cfg.num_layers):
        attn, mlp = f"transformer/layer_{layer}/attn", f"transformer/layer_{layer}/mlp"
        for part in ("query", "key", "value", "linear"):
            arrays[f"{layer}.{part}.w"] = np.asarray(params[f"{attn}/{part}"]["w"])
            arrays[f"{layer}.{part}.b"] = np.asarray(params[f"{attn}/{part}"]["b"])
        for part in ("linear_1", "linear_2"):
            arrays[f"{layer}.{part}.w"] = np.asarray(params[f"{mlp}/{part}"]["w"])
            arrays[f"{layer}.{part}.b"] = np.asarray(params[f"{mlp}/{part}"]["b"])
    W_U, classes = _unembedding(model, program, labels)
    arrays["W_U"] = W_U
    encoding = model.input_encoder.encoding_map  # token → id
    inputs = [[BOS, *words] for words in itertools.product(sorted(VOCAB), repeat=MAX_SEQ_LEN)]
    run = model.forward(params, np.array([[encoding[t] for t in item] for item in inputs]))  # one batched pass
    final = np.asarray(run.transformer_output.output)  # [inputs, positions, d_model]
    arrays["final_residual"] = final
    out_values = final @ W_U  # [inputs, positions, classes]
    if rasp.is_numerical(program):
        outputs = out_values[:, 1:, 0].tolist()
    else:
        outputs = [[classes[c] for c in row] for row in out_values[:, 1:].argmax(-1).tolist()]
    np.savez(out / f"{name}.npz", **{k: v.astype(np.float64) for k, v in arrays.items()})
    meta = dict(program=name, n_layers=cfg.num_layers, n_heads=cfg.num_heads, d_head=cfg.key_size,
                d_mlp=cfg.mlp_hidden_size, d_model=len(labels), n_ctx=MAX_SEQ_LEN + 1, causal=cfg.causal,
                layer_norm=cfg.layer_norm, residual_labels=labels, encoding=encoding, bos=BOS,
                numerical=bool(rasp.is_numerical(program)), classes=classes, inputs=inputs, outputs=outputs)
    (out / f"{name}.json").write_text(json.dumps(meta))


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: tracr_export.py OUT_DIR", file=sys.stderr)
        return 2
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    for name in PROGRAMS:
        export(name, out)
        print(f"wrote {out / name}.npz and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
