"""The ``gradgraph`` command."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from gradgraph.errors import GradGraphError


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def cmd_models(args: argparse.Namespace) -> None:
    from gradgraph.models import EMBEDDED

    print("Embedded models (load offline):")
    for entry in EMBEDDED.values():
        print(f"  {entry.name:<14} {entry.description}")
    print("Also accepted: TransformerLens official names (need the hub) and local Hugging Face folders.")


def cmd_sva_eval(args: argparse.Namespace) -> None:
    from gradgraph.data import sva_items
    from gradgraph.evaluate import accuracy_table, evaluate_sva, format_table, take
    from gradgraph.models import load_model
    from gradgraph.plot import sva_accuracy

    start = time.time()
    model = load_model(args.model)
    items = take(sva_items(model.tokenizer, seed=args.seed, prepend_bos=model.cfg.default_prepend_bos),
                 args.limit, seed=args.seed)
    results = evaluate_sva(model, items, batch_size=args.batch_size)
    table = accuracy_table(results)
    print(f"\nSVA accuracy of {args.model} ({len(results)} items; good verb's logit > bad verb's):")
    print(format_table(table))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sva_eval_items.json").write_text(json.dumps(results, indent=1))
    (out / "sva_eval_accuracy.json").write_text(json.dumps(table, indent=1))
    figure = sva_accuracy(table, Path(args.figures) / "sva_eval_accuracy.png",
                          title=f"SVA accuracy, {args.model} ({len(results)} items)")
    print(f"\nwrote {out / 'sva_eval_items.json'}, {out / 'sva_eval_accuracy.json'}, {figure} "
          f"({time.time() - start:.1f} s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gradgraph", description="Gradient graphs of TransformerLens models.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("models", help="list the embedded models").set_defaults(func=cmd_models)
    p = sub.add_parser("sva-eval", help="accuracy on subject-verb agreement by condition and attractors")
    p.add_argument("--model", default="smollm2-135m", help="embedded name, TransformerLens name or HF folder")
    p.add_argument("--limit", type=_positive, default=None, help="evaluate at most N items (spread over cells)")
    p.add_argument("--out", default="results", help="folder for the JSON results (default: results)")
    p.add_argument("--figures", default="figures", help="folder for the figure (default: figures)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=_positive, default=32)
    p.set_defaults(func=cmd_sva_eval)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except GradGraphError as error:
        print(f"gradgraph: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
