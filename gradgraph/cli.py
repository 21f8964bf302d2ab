"""The ``gradgraph`` command. Every study's options take their defaults from its ``Config``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import fields

from gradgraph.errors import GradGraphError, OutputIncomplete


def _integer(minimum: int, what: str):
    """An argparse type: an integer of at least ``minimum`` (``what`` names it in errors)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


_positive = _integer(1, "a positive integer")
_count = _integer(0, "a whole number >= 0")


def _defaults(config_class) -> dict:
    return {f.name: f.default for f in fields(config_class)}


def cmd_models(args: argparse.Namespace) -> None:
    from gradgraph.arch.models import EMBEDDED, TINY

    print("Embedded models (load offline):")
    for entry in EMBEDDED.values():
        print(f"  {entry.name:<14} {entry.description}")
    for name, (embedded, sizes) in TINY.items():
        print(f"  {name:<14} random weights, {sizes['num_hidden_layers']} layers, d_model {sizes['hidden_size']}, "
              f"{embedded}'s tokenizer: tries any command in seconds (its numbers mean nothing)")
    print("Also accepted: TransformerLens official names (need the hub) and local Hugging Face folders.")


def cmd_sva_eval(args: argparse.Namespace) -> None:
    from gradgraph.arch.models import load_model
    from gradgraph.data import sva_items
    from gradgraph.evaluate import accuracy_table, evaluate_sva, format_table, take
    from gradgraph.plot import sva_accuracy
    from gradgraph.studies.output import staged_run

    start = time.time()
    model = load_model(args.model, device=args.device)
    items = take(sva_items(model.tokenizer, seed=args.seed, prepend_bos=model.cfg.default_prepend_bos),
                 args.limit, seed=args.seed)
    results = evaluate_sva(model, items, batch_size=args.batch_size)
    table = accuracy_table(results)
    print(f"\nSVA accuracy of {args.model} ({len(results)} items; good verb's logit > bad verb's):")
    print(format_table(table))
    with staged_run(args.out, args.figures, "gradgraph sva-eval") as out:
        out.path("items.json").write_text(json.dumps(results, indent=1))
        out.path("accuracy.json").write_text(json.dumps(table, indent=1))
        figure = sva_accuracy(table, out.figure("sva_eval_accuracy.png"),
                              title=f"SVA accuracy, {args.model} ({len(results)} items)")
        figure = out.final(figure)
    print(f"\nwrote {args.out}/items.json, {args.out}/accuracy.json, {figure} ({time.time() - start:.1f} s)")


def _methods(text: str) -> tuple[str, ...]:
    """``--methods flow,attn_lrp`` (commas or spaces)."""
    from gradgraph.component_methods import check_methods

    names = tuple(n for n in text.replace(",", " ").split() if n)
    try:
        return check_methods(names)
    except GradGraphError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def cmd_sva(args: argparse.Namespace) -> None:
    from gradgraph.studies import sva

    if args.redraw:
        sva.redraw(args.redraw, args.figures)
        return
    sva.main(sva.Config(model=args.model, device=args.device, limit=args.limit, intervention_items=args.intervention_items,
                        batch_size=args.batch_size, methods=args.methods, udig_steps=args.udig_steps,
                        head_sentences=args.head_sentences, resamples=args.resamples, out=args.out,
                        figures=args.figures, seed=args.seed))


def cmd_heads(args: argparse.Namespace) -> None:
    from gradgraph.studies import head_ranking

    if args.redraw:
        head_ranking.redraw(args.redraw, args.figures)
        return
    missing = [f"--{name}" for name in ("prompts", "good", "bad") if getattr(args, name) is None]
    if missing:
        raise GradGraphError(f"gradgraph heads needs {', '.join(missing)} (or --redraw OUT to draw a saved run again)")
    head_ranking.main(head_ranking.Config(
        prompts=args.prompts, device=args.device, good=args.good, bad=args.bad, counterfactuals=args.counterfactuals,
        position=args.position, model=args.model, methods=args.methods, udig_steps=args.udig_steps,
        head_sentences=args.head_sentences, resamples=args.resamples, top=args.top, out=args.out,
        figures=args.figures))


def cmd_circuit(args: argparse.Namespace) -> None:
    from gradgraph.studies import circuit

    if args.redraw:
        circuit.redraw(args.redraw, args.figures)
        return
    methods = tuple(n for n in args.methods.replace(",", " ").split() if n)
    circuit.main(circuit.Config(
        task=args.task, items=args.items, prompts=args.prompts, counterfactuals=args.counterfactuals, good=args.good,
        bad=args.bad, methods=methods, steps=args.steps, size=args.size, resamples=args.resamples,
        batch_size=args.batch_size, model=args.model, seed=args.seed, out=args.out, figures=args.figures))


def cmd_compiled(args: argparse.Namespace) -> None:
    from gradgraph.studies import compiled

    programs = tuple(n for n in args.programs.replace(",", " ").split() if n)
    compiled.main(compiled.Config(tracr=args.tracr, programs=programs, items=args.items, steps=args.steps,
                                  distractor_heads=args.distractor_heads, distractor_neurons=args.distractor_neurons,
                                  seed=args.seed, out=args.out))


def cmd_synthetic(args: argparse.Namespace) -> None:
    from gradgraph.studies import synthetic

    if args.redraw:
        synthetic.redraw(args.redraw, args.figures)
        return
    synthetic.main(synthetic.Config(device=args.device, seed=args.seed, steps=args.steps, induction_seeds=args.induction_seeds,
                                    out=args.out, figures=args.figures, threads=args.threads,
                                    progress=args.progress))


def cmd_head_types(args: argparse.Namespace) -> None:
    from gradgraph.studies import head_types

    if args.redraw:
        head_types.redraw(args.redraw, args.figures)
        return
    head_types.main(head_types.Config(device=args.device, corpus=args.corpus, sentences=args.sentences, threshold=args.threshold,
                                      margin=args.margin, model=args.model, out=args.out,
                                      figures=args.figures or f"{args.out}/figures"))


def cmd_lrp_eval(args: argparse.Namespace) -> None:
    from gradgraph.studies import lrp_eval

    if args.redraw:
        lrp_eval.redraw(args.redraw, args.figures)
        return
    lrp_eval.main(lrp_eval.Config(sentences=args.sentences, sva_items=args.sva_items, relp_items=args.relp_items,
                                  head_sentences=args.head_sentences, max_words=args.max_words,
                                  graph_tokens=args.graph_tokens, seed=args.seed, model=args.model, device=args.device, out=args.out,
                                  figures=args.figures or f"{args.out}/figures"))


def cmd_explain(args: argparse.Namespace) -> None:
    from gradgraph import plot
    from gradgraph.arch.models import load_model
    from gradgraph.attribution import attribute
    from gradgraph.metrics import logit_diff
    from gradgraph.prompts import single_token_id

    model = load_model(args.model, device=args.device)
    good, bad = single_token_id(model.tokenizer, args.good), single_token_id(model.tokenizer, args.bad)
    metric = logit_diff(good, bad)
    options = {"ig": dict(steps=args.steps), "dig": dict(steps=args.steps, strategy=args.strategy),
               "udig": dict(steps=args.steps, strategy=args.strategy), "smoothgrad": dict(samples=args.steps)}
    lines, tokens = {}, None
    for method in args.method:
        start = time.time()
        result = attribute(model, args.text, metric, method=method, baseline=args.baseline,
                           **options.get(method, {}))
        tokens = [model.tokenizer.decode([t]) for t in result.tokens[0].tolist()]
        scores = result.scores[0].tolist()
        lines[result.method] = scores
        print(f"{result.method}  ({time.time() - start:.1f} s)")
        if sys.stdout.isatty():
            print("  " + plot.ansi_tokens(tokens, scores))
        else:  # no colours in a file or pipe: the scores in brackets
            print("  " + " ".join(f"{t!r}[{v:+.3f}]" for t, v in zip(tokens, scores)))
        print(f"  F(x) − F(x′) = {float(result.target[0]):+.4f}   Σ scores = {float(result.scores[0].sum()):+.4f}   "
              f"delta = {float(result.delta[0]):+.4f}")
    path = plot.token_scores(tokens, lines, args.figure,
                             title=f"{args.text!r}: logit({args.good!r}) − logit({args.bad!r}), {args.model}")
    print(f"wrote {path}")


def cmd_attr_eval(args: argparse.Namespace) -> None:
    from gradgraph.studies import attr_eval

    if args.redraw:
        attr_eval.redraw(args.redraw, args.figures)
        return
    attr_eval.main(attr_eval.Config(sentences=args.sentences, sva_items=args.sva_items, corpus=args.corpus,
                                    steps=args.steps, samples=args.samples, max_words=args.max_words,
                                    seed=args.seed, model=args.model, device=args.device, out=args.out,
                                    figures=args.figures or f"{args.out}/figures"))


def _redraw_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redraw", metavar="OUT", help="draw the tables, figures and reports of the run saved in OUT "
                                                   "again, without the model or any computing (after a failed figure, "
                                                   "say); the other options but --figures are then ignored")


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value}")
    return value


def parser() -> argparse.ArgumentParser:
    from gradgraph.component_methods import METHODS
    from gradgraph.studies import attr_eval, circuit, compiled, head_ranking, head_types, lrp_eval, sva, synthetic

    top = argparse.ArgumentParser(prog="gradgraph", description="Gradient graphs of TransformerLens models.")
    sub = top.add_subparsers(dest="command", required=True)
    sub.add_parser("models", help="list the embedded models").set_defaults(func=cmd_models)

    p = sub.add_parser("sva-eval", help="accuracy on subject-verb agreement by condition and attractors")
    p.add_argument("--model", default="smollm2-135m", help="embedded name, TransformerLens name or HF folder")
    p.add_argument("--limit", type=_positive, default=None, help="evaluate at most N items (spread over cells)")
    p.add_argument("--out", default="results/sva-eval", help="folder for the JSON results (default: results/sva-eval)")
    p.add_argument("--figures", default="figures", help="folder for the figure (default: figures)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=_positive, default=32)
    p.set_defaults(func=cmd_sva_eval)

    d = _defaults(sva.Config)
    p = sub.add_parser("sva", help="the SVA study: every method's components against interventions, tokens, "
                                   "shares, entropy, paths; an interactive report")
    p.add_argument("--model", default=d["model"], help="embedded name, TransformerLens name or HF folder")
    p.add_argument("--limit", type=_positive, default=d["limit"],
                   help=f"items for the graph methods (default {d['limit']})")
    p.add_argument("--intervention-items", type=_positive, default=d["intervention_items"],
                   help=f"items for mean ablation, patching and UDIG, among the --limit ones (default "
                        f"{sva.INTERVENTION_ITEMS}, or all of them when --limit is smaller)")
    p.add_argument("--methods", type=_methods, default=d["methods"],
                   help=f"comma-separated, from {','.join(METHODS)} (default: all)")
    p.add_argument("--udig-steps", type=_positive, default=d["udig_steps"], help="UDIG's anchors m")
    p.add_argument("--head-sentences", type=_positive, default=d["head_sentences"],
                   help="sentences for Mask-LRP's syntactic and positional heads")
    p.add_argument("--resamples", type=_positive, default=d["resamples"], help="bootstrap resamples of the items")
    p.add_argument("--batch-size", type=_positive, default=d["batch_size"], help="items per gradient graph")
    p.add_argument("--out", default=d["out"], help=f"folder for tables, figures and the report (default {d['out']})")
    p.add_argument("--figures", default=None, help="folder for the figures (default: OUT/figures)")
    p.add_argument("--seed", type=int, default=d["seed"])
    _redraw_option(p)
    p.set_defaults(func=cmd_sva)

    d = _defaults(head_ranking.Config)
    p = sub.add_parser("heads", help="rank every head by every method for your prompts")
    p.add_argument("--prompts", help="text file, one prompt per line (required unless --redraw)")
    p.add_argument("--good", help="the expected next token, e.g. ' are' (one token; required unless --redraw)")
    p.add_argument("--bad", help="the contrasting token, e.g. ' is' (one token; required unless --redraw)")
    p.add_argument("--counterfactuals", help="optional file of aligned counterfactual prompts (for patching)")
    p.add_argument("--position", type=int, default=d["position"], help="metric position (default: each prompt's last token)")
    p.add_argument("--model", default=d["model"])
    p.add_argument("--methods", type=_methods, default=d["methods"],
                   help=f"comma-separated, from {','.join(METHODS)} (default: all; the patching ones need "
                        f"--counterfactuals)")
    p.add_argument("--udig-steps", type=_positive, default=d["udig_steps"], help="UDIG's anchors m")
    p.add_argument("--head-sentences", type=_positive, default=d["head_sentences"],
                   help="sentences for Mask-LRP's syntactic and positional heads")
    p.add_argument("--resamples", type=_positive, default=d["resamples"], help="bootstrap resamples of the prompts")
    p.add_argument("--top", type=_positive, default=d["top"], help="components printed per method")
    p.add_argument("--out", default=d["out"])
    p.add_argument("--figures", default=None, help="folder for the figures (default: OUT/figures)")
    _redraw_option(p)
    p.set_defaults(func=cmd_heads)

    d = _defaults(circuit.Config)
    p = sub.add_parser("circuit", help="edge scores by every method, circuits, their faithfulness (MIB's CPR, CMD)")
    p.add_argument("--task", choices=circuit.TASKS, default=d["task"],
                   help="ioi (ABC counterfactuals), sva (the subject's other number), copying (the copied word "
                        "changed), each generated, or prompts (your own, with --prompts, --counterfactuals, "
                        "--good, --bad)")
    p.add_argument("--items", type=_positive, default=d["items"], help="items of a generated task the model gets right")
    p.add_argument("--prompts", help="--task prompts: text file, one prompt per line")
    p.add_argument("--counterfactuals", help="--task prompts: aligned counterfactual prompts, one per line")
    p.add_argument("--good", help="--task prompts: the expected next token (one token)")
    p.add_argument("--bad", help="--task prompts: the contrasting token (one token)")
    p.add_argument("--methods", default=",".join(d["methods"]), help=f"comma-separated, from {','.join(circuit.ALL)}")
    p.add_argument("--steps", type=_positive, default=d["steps"], help="EAP-IG's points")
    p.add_argument("--size", type=float, default=d["size"], help="share of the edges in each exported circuit")
    p.add_argument("--resamples", type=_positive, default=d["resamples"], help="bootstrap resamples of the prompts")
    p.add_argument("--batch-size", type=_positive, default=d["batch_size"], help="prompts scored at a time")
    p.add_argument("--model", default=d["model"])
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--out", default=d["out"])
    p.add_argument("--figures", default=None, help="folder for the figures (default: OUT/figures)")
    _redraw_option(p)
    p.set_defaults(func=cmd_circuit)

    d = _defaults(compiled.Config)
    p = sub.add_parser("compiled", help="every method's node, edge and token AUROC against tracr-compiled circuits")
    p.add_argument("--tracr", default=None, help="folder of the compiled programs (tracr_export.py's output; default "
                                                 "the cache's, compiled there with .venv-tracr when absent)")
    p.add_argument("--programs", default=",".join(d["programs"]), help="comma-separated, from "
                                                                         f"{','.join(d['programs'])}")
    p.add_argument("--items", type=_positive, default=d["items"], help="inputs, each with a counterfactual")
    p.add_argument("--steps", type=_positive, default=d["steps"], help="EAP-IG's points")
    p.add_argument("--distractor-heads", type=int, default=d["distractor_heads"], help="extra heads per layer")
    p.add_argument("--distractor-neurons", type=int, default=d["distractor_neurons"], help="extra MLP neurons per layer")
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--out", default=d["out"])
    p.set_defaults(func=cmd_compiled)

    d = _defaults(synthetic.Config)
    p = sub.add_parser("synthetic", help="Du et al.'s synthetic validation on small trained models (CPU minutes)")
    p.add_argument("--seed", type=int, default=d["seed"], help="seed of the first-token models")
    p.add_argument("--steps", type=_positive, default=d["steps"], help="training steps of the first-token model")
    p.add_argument("--induction-seeds", type=int, nargs="+", default=synthetic.Config().induction_seeds)
    p.add_argument("--out", default=d["out"])
    p.add_argument("--figures", default=d["figures"])
    p.add_argument("--threads", type=_positive, default=d["threads"],
                   help="torch threads (tiny models run fastest on one; more on a busy CPU are far slower)")
    p.add_argument("--progress", action="store_true", help="progress bars while training")
    _redraw_option(p)
    p.set_defaults(func=cmd_synthetic)

    d = _defaults(head_types.Config)
    p = sub.add_parser("head-types", help="positional and syntactic heads (Mask-LRP's detection) over a corpus")
    p.add_argument("--corpus", help="text file, one sentence per line (default: shipped RT and SVA sentences)")
    p.add_argument("--sentences", type=_positive, default=d["sentences"], help="of the shipped corpus")
    p.add_argument("--threshold", type=_fraction, default=d["threshold"], help="positional share threshold ξ_pos")
    p.add_argument("--margin", type=_fraction, default=d["margin"], help="syntactic margin over the baseline ξ_synt")
    p.add_argument("--model", default=d["model"])
    p.add_argument("--out", default=d["out"])
    p.add_argument("--figures", default=None, help="default: OUT/figures")
    _redraw_option(p)
    p.set_defaults(func=cmd_head_types)

    p = sub.add_parser("explain", help="token attributions of one prediction, coloured in the terminal and drawn")
    p.add_argument("text", help="the prompt; the prediction explained is the next token after it")
    p.add_argument("--good", required=True, help="the expected next token, e.g. ' are' (one token)")
    p.add_argument("--bad", required=True, help="the contrasting token, e.g. ' is' (one token)")
    p.add_argument("--method", nargs="+", default=["udig"],
                   choices=["saliency", "grad_x_input", "smoothgrad", "ig", "dig", "udig"],
                   help="one or more methods (default: udig)")
    p.add_argument("--steps", type=_positive, default=30, help="IG steps, DIG/UDIG anchors m, SmoothGrad samples")
    p.add_argument("--strategy", choices=["greedy", "maxcount"], default="greedy", help="DIG/UDIG anchor choice")
    p.add_argument("--baseline", choices=["pad", "eos", "zeros"], default="pad")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--figure", default="results/explain/explain.png", help="where the figure goes")
    p.set_defaults(func=cmd_explain)

    d = _defaults(lrp_eval.Config)
    p = sub.add_parser("lrp-eval", help="LRP, Mask-LRP and baselines by deletion (AOPC, log-odds); RelP vs patching")
    p.add_argument("--sentences", type=_positive, default=d["sentences"], help="Rotten Tomatoes sentences")
    p.add_argument("--sva-items", type=_positive, default=d["sva_items"])
    p.add_argument("--relp-items", type=_count, default=d["relp_items"],
                   help="SVA items for relevance patching against activation patching (0: skip)")
    p.add_argument("--head-sentences", type=_positive, default=d["head_sentences"], help="corpus for head types")
    p.add_argument("--max-words", type=_positive, default=d["max_words"], help="longest review, in words")
    p.add_argument("--graph-tokens", type=_positive, default=d["graph_tokens"],
                   help=f"padded tokens per gradient graph (default {d['graph_tokens']}; memory grows with it)")
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--model", default=d["model"])
    p.add_argument("--out", default=d["out"])
    p.add_argument("--figures", default=None, help="default: OUT/figures")
    _redraw_option(p)
    p.set_defaults(func=cmd_lrp_eval)

    d = _defaults(attr_eval.Config)
    p = sub.add_parser("attr-eval", help="IG, DIG, UDIG, LAFA, SmoothGrad, saliency: log-odds, comp, suff, AOPC")
    p.add_argument("--sentences", type=_positive, default=d["sentences"], help="Rotten Tomatoes sentences")
    p.add_argument("--sva-items", type=_positive, default=d["sva_items"])
    p.add_argument("--corpus", type=_positive, default=d["corpus"], help="LAFA's reference texts per dataset")
    p.add_argument("--steps", type=_positive, default=d["steps"], help="DIG/UDIG anchors m (IG: m + 2 points)")
    p.add_argument("--samples", type=_positive, default=d["samples"], help="SmoothGrad samples")
    p.add_argument("--max-words", type=_positive, default=d["max_words"], help="longest review, in words")
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--model", default=d["model"])
    p.add_argument("--out", default=d["out"])
    p.add_argument("--figures", default=None, help="default: OUT/figures")
    _redraw_option(p)
    p.set_defaults(func=cmd_attr_eval)
    for command, p in sub.choices.items():
        if command != "models":
            p.add_argument("--device", default="auto",
                           help="where the model runs: auto (a GPU when torch sees one, else the CPU), cpu, cuda, "
                                "cuda:N or mps (default auto)")
    return top


def main(argv: list[str] | None = None) -> int:
    from gradgraph.allocator import keep_freed_memory

    args = parser().parse_args(argv)
    keep_freed_memory()  # a third faster on CPU: freed tensors' pages are reused, not faulted in anew
    try:
        if getattr(args, "device", None) is not None:  # a device this machine lacks: refused before any work
            from gradgraph.arch.devices import choose

            choose(args.device)
        args.func(args)
    except OutputIncomplete as error:  # computed and saved, but some output failed: 1
        print(f"gradgraph: error: {error}", file=sys.stderr)
        return 1
    except GradGraphError as error:  # a bad input, refused before any work: 2
        print(f"gradgraph: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
