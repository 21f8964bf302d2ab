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


def cmd_sva(args: argparse.Namespace) -> None:
    from gradgraph.sva_study import StudyConfig, run_sva_study

    run_sva_study(StudyConfig(model=args.model, limit=args.limit, intervention_items=args.intervention_items,
                              out=args.out, figures=args.figures, seed=args.seed))


def cmd_heads(args: argparse.Namespace) -> None:
    from gradgraph.head_importance import rank_heads, read_prompts
    from gradgraph.models import load_model

    prompts = read_prompts(args.prompts)
    counterfactuals = read_prompts(args.counterfactuals) if args.counterfactuals else None
    model = load_model(args.model)
    rows = rank_heads(model, prompts, args.good, args.bad, counterfactuals=counterfactuals, position=args.position,
                      out=args.out, figures=args.figures)
    heads = [r for r in rows if r["head"] != ""]
    for key in [k for k in rows[0] if k not in ("component", "layer", "head")]:
        top = sorted(heads, key=lambda r: -abs(r[key]))[: args.top]
        print(f"top heads by {key:<12}: " + ", ".join(f"{r['component']} ({r[key]:+.3g})" for r in top))
    print(f"wrote {args.out}/heads.csv and figures/heads_*.png")


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
    p = sub.add_parser("sva", help="the SVA study: accuracy, q/k/v/skip shares, head rankings, entropy, paths")
    p.add_argument("--model", default="smollm2-135m", help="embedded name, TransformerLens name or HF folder")
    p.add_argument("--limit", type=_positive, default=96, help="items for the gradient analyses (default 96)")
    p.add_argument("--intervention-items", type=_positive, default=16,
                   help="items for mean ablation and patching (default 16)")
    p.add_argument("--out", default="results/sva", help="folder for tables and the report")
    p.add_argument("--figures", default="figures", help="folder for the figures")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_sva)
    p = sub.add_parser("heads", help="rank every head by every method for your prompts")
    p.add_argument("--prompts", required=True, help="text file, one prompt per line")
    p.add_argument("--good", required=True, help="the expected next token, e.g. ' are' (one token)")
    p.add_argument("--bad", required=True, help="the contrasting token, e.g. ' is' (one token)")
    p.add_argument("--counterfactuals", help="optional file of aligned counterfactual prompts (for patching)")
    p.add_argument("--position", type=int, default=-1, help="metric position (default: each prompt's last token)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--top", type=_positive, default=8)
    p.add_argument("--out", default="results/heads")
    p.add_argument("--figures", default="figures")
    p.set_defaults(func=cmd_heads)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except GradGraphError as error:
        print(f"gradgraph: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
