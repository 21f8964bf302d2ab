"""Synthetic validation (Du et al. 2023, §5.1) on the CPU, in a few minutes.

1. First-token-repeated (Du et al.'s FirstTokenRepeatedOnce: vocabulary 20, length 10, balanced),
   read at the last position of a one-layer causal model: train, report accuracy and the q / k / v /
   skip shares of the top gradient paths at the first and the last position. Also the reversed
   sequences (the tested token at the reading position: the causal mirror of Du et al.'s setting)
   on Du et al.'s model size (d_model 16, 2 heads).
2. Induction (two layers): the head that moves the answer to the last position is known by
   construction and found without gradients (attention to the answer's position, mean ablation at
   the last position); does gradient flow rank it first? Several seeds.

Writes ``<out>/summary.json``, ``<out>/shares.csv``, ``<out>/induction_heads.csv`` and
``<figures>/synthetic_shares.png``.

    .venv/bin/python analyses/synthetic.py [--seed 0] [--steps 3000] [--induction-seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from gradgraph import synthetic  # noqa: E402
from gradgraph.components import BRANCHES  # noqa: E402

# Du et al.'s released notebook (BERT-like bidirectional classifier): mean top-path gradient per branch
DU_ET_AL = {"k": 0.030, "q": 0.017, "skip": 0.0094, "v": 0.00095}


def shares_table(name: str, rows: list[dict]) -> str:
    lines = [f"{name}: q/k/v/skip of the top gradient paths at the attention input (layer 0, mean over sequences)",
             f"  {'position':<8} {'':<16}" + "".join(f"{b:>10}" for b in BRANCHES)]
    for position in ("first", "last"):
        for key, title in (("share_oplus", "share (top path)"), ("share_bucket", "share (per unit)"),
                           ("top_value", "branch top path")):
            values = [next(r[key] for r in rows if r["position"] == position and r["branch"] == b) for b in BRANCHES]
            lines.append(f"  {position:<8} {title:<16}" + "".join(f"{v:>10.4g}" for v in values))
    return "\n".join(lines)


def head_table(result: dict) -> str:
    flow, last = result["flow"], result["flow_last_position"]
    attn, drop, drop_all = result["attention"], result["ablation_drop"], result["ablation_drop_all_positions"]
    lines = [f"  {'head':<6}{'attn→answer':>12}{'ablate@last':>12}{'ablate@all':>11}{'flow (all pos)':>16}{'flow (last)':>13}"]
    for layer in range(flow.shape[0]):
        for head in range(flow.shape[1]):
            lines.append(f"  L{layer}H{head:<4}{attn[layer, head]:>12.3f}{drop[layer, head]:>12.3f}"
                         f"{drop_all[layer, head]:>11.3f}{flow[layer, head]:>16.4g}{last[layer, head]:>13.4g}")
    return "\n".join(lines)


def plot(first: dict, mirror: dict, heads: list[tuple[int, dict]], path: Path) -> Path:
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), gridspec_kw=dict(width_ratios=[1, 1, 1.2]))
    colors = {"first": "#4C72B0", "last": "#DD8452"}
    for ax, (title, result) in zip(axes[:2], (
        (f"first token repeated (1 layer, d_model {first['config']['d_model']})\n"
         f"test accuracy {first['test_accuracy']:.3f}", first),
        (f"reversed: tested token read last (1 layer, d_model {mirror['config']['d_model']})\n"
         f"test accuracy {mirror['test_accuracy']:.3f}", mirror),
    )):
        for j, position in enumerate(("first", "last")):
            ys = [next(r["share_oplus"] for r in result["branches"] if r["position"] == position and r["branch"] == b)
                  for b in BRANCHES]
            label = "position 0" if position == "first" else "last position"
            ax.bar([i + (j - 0.5) * 0.38 for i in range(4)], ys, 0.38, label=label, color=colors[position])
        ax.set_xticks(range(4), BRANCHES)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("share of top gradient paths")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)
    ax = axes[2]
    labels = sorted(heads[0][1]["flow_ranking"])
    width = 0.8 / len(heads)
    for k, (seed, result) in enumerate(heads):
        flow = result["flow"].flatten()
        ys = (flow / flow.max()).tolist()
        xs = [i + (k - (len(heads) - 1) / 2) * width for i in range(len(labels))]
        ax.bar(xs, ys, width, label=f"seed {seed}", color=f"C{k}")
        responsible = result["top"]["ablation"]
        i = labels.index(responsible)
        ax.text(xs[i], ys[i] + 0.02, "*", ha="center", fontsize=12)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylim(0, 1.35)
    ax.set_ylabel("gradient flow through hook_z / max")
    ax.set_title("induction (2 layers): gradient flow per head\n* = head found by attention and ablation", fontsize=9)
    ax.legend(fontsize=8, ncols=len(heads), loc="upper center")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def jsonable(result: dict) -> dict:
    out = {}
    for key, value in result.items():
        if key in ("model", "losses"):
            continue
        out[key] = value.tolist() if isinstance(value, torch.Tensor) else value
    out["final_loss"] = sum(result["losses"][-50:]) / len(result["losses"][-50:])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="seed of the first-token models")
    parser.add_argument("--steps", type=int, default=3000, help="training steps of the first-token model")
    parser.add_argument("--induction-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="results/synthetic")
    parser.add_argument("--figures", default="figures")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (tiny models run fastest on one; more threads on a busy CPU are far slower)")
    parser.add_argument("--progress", action="store_true", help="tqdm progress bars while training")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out, figures = Path(args.out), Path(args.figures)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    print(f"[1/3] first token repeated, 1 layer {synthetic.FIRST_TOKEN_CONFIG}, {args.steps} steps ...", flush=True)
    first = synthetic.run_first_token(seed=args.seed, steps=args.steps, n_train=50_000, progress=args.progress)
    print(f"  accuracy train {first['train_accuracy']:.4f}, held-out {first['test_accuracy']:.4f} "
          f"({first['n_test_unseen']} unseen sequences); trained in {first['seconds']:.0f} s")
    print(shares_table("first token repeated", first["branches"]))

    print(f"[2/3] reversed sequences, 1 layer {synthetic.MIRROR_CONFIG} ...", flush=True)
    mirror = synthetic.run_first_token(seed=args.seed, reverse=True, steps=1000, lr=3e-3, progress=args.progress)
    print(f"  accuracy train {mirror['train_accuracy']:.4f}, held-out {mirror['test_accuracy']:.4f}; "
          f"trained in {mirror['seconds']:.0f} s")
    print(shares_table("reversed (tested token read last)", mirror["branches"]))
    print("  Du et al. (bidirectional, their model): mean top-path gradient " +
          ", ".join(f"{k.upper()} {v}" for k, v in DU_ET_AL.items()))

    heads = []
    for seed in args.induction_seeds:
        print(f"[3/3] induction, 2 layers {synthetic.INDUCTION_CONFIG}, seed {seed} ...", flush=True)
        result = synthetic.run_induction(seed=seed, progress=args.progress)
        heads.append((seed, result))
        print(f"  accuracy held-out {result['test_accuracy']:.4f} (before pruning {result['accuracy_before_pruning']:.4f});"
              f" trained in {result['seconds']:.0f} s")
        print(head_table(result))
        print(f"  responsible head: {result['top']['attention']} (attention), {result['top']['ablation']} (ablation); "
              f"gradient flow ranks {result['flow_ranking']} (top/runner-up {result['flow_ratio']:.2f}); "
              f"at the last position {result['flow_last_position_ranking']}; previous-token head "
              f"{result['previous_token_head']}; agree: {result['agree']}")

    agree = sum(r["agree"] for _, r in heads)
    agree_last = sum(r["flow_last_position_ranking"][0] == r["top"]["ablation"] for _, r in heads)
    print(f"gradient flow (summed over positions) ranks the responsible head first in {agree}/{len(heads)} seeds; "
          f"at the last position in {agree_last}/{len(heads)}")

    summary = dict(
        first_token=jsonable(first), first_token_reversed=jsonable(mirror),
        induction={str(seed): jsonable(r) for seed, r in heads},
        induction_agree=agree, induction_agree_last_position=agree_last, induction_seeds=len(heads),
        du_et_al_top_path_gradient=DU_ET_AL, seconds=time.perf_counter() - start,
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    with open(out / "shares.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["task", "position", "pos", "layer", "branch", "share_oplus", "share_bucket",
                                         "top_value"])
        writer.writeheader()
        for task, result in (("first_token", first), ("first_token_reversed", mirror)):
            for row in result["branches"]:
                writer.writerow(dict(task=task, **row))
    with open(out / "induction_heads.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["seed", "head", "attention_to_answer", "ablation_drop_last", "ablation_drop_all",
                         "flow_all_positions", "flow_last_position", "responsible", "previous_token_head"])
        for seed, r in heads:
            for layer in range(r["flow"].shape[0]):
                for head in range(r["flow"].shape[1]):
                    name = f"L{layer}H{head}"
                    writer.writerow([seed, name, float(r["attention"][layer, head]), float(r["ablation_drop"][layer, head]),
                                     float(r["ablation_drop_all_positions"][layer, head]), float(r["flow"][layer, head]),
                                     float(r["flow_last_position"][layer, head]), name == r["top"]["ablation"],
                                     name == r["previous_token_head"]])
    figure = plot(first, mirror, heads, figures / "synthetic_shares.png")
    print(f"wrote {out / 'summary.json'}, {out / 'shares.csv'}, {out / 'induction_heads.csv'}, {figure} "
          f"({summary['seconds']:.0f} s in all)")


if __name__ == "__main__":
    main()
