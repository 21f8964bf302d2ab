"""Synthetic validation (Du et al. 2023, §5.1): small models trained on tasks with a known answer.

Two tasks (``gradgraph.data.synthetic``), each read at the last position of a causal model:

- first token repeated: in the forward order a one-layer causal model cannot compare tokens (no
  position knows the first token before the attention layer); it has to read the first token and a
  bag of the others and compare them in the MLP, which takes a wider model (``FIRST_TOKEN_SHAPE``).
  Reversed, the tested token sits at the reading position: the causal mirror of Du et al.'s
  bidirectional model, in which the first token's own position looks up its repeat (q·k).
- induction: in a two-layer model only a layer-1 head can move x_{i+1} to the last position
  (attending to position i+1, which it finds through a layer-0 previous-token head), so the
  responsible head is known by construction and can be found without gradients: by its attention
  from the last position and by ablating its output there.

``head_flow`` ranks heads by gradient flow (``gradient_flow`` through ``hook_z``), ``branch_table``
gives the q / k / v / skip shares of ``branch_shares`` and each branch's own top-path value.
Config → run → write: ``main(Config())`` trains the models, prints the tables and writes
``summary.json``, ``shares.csv``, ``induction_heads.csv`` and ``synthetic_shares.png``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import time
from dataclasses import asdict, dataclass, field

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from gradgraph.arch import devices, hooks, lens, names  # noqa: E402
from gradgraph.arch.lens import Model  # noqa: E402
from gradgraph.arch.models import tiny_model  # noqa: E402
from gradgraph.backprop import backprop  # noqa: E402
from gradgraph.branches import BRANCHES, branch_shares  # noqa: E402
from gradgraph.build import build_graph  # noqa: E402
from gradgraph.data.synthetic import answer_ids, first_token_repeated, induction, unseen  # noqa: E402
from gradgraph.graph import GradGraph  # noqa: E402
from gradgraph.labels import Component, Registry  # noqa: E402
from gradgraph.metrics import logit_diff  # noqa: E402
from gradgraph.paths import gradient_flow  # noqa: E402
from gradgraph.semirings import Max  # noqa: E402
from gradgraph.studies.output import staged_run  # noqa: E402
from gradgraph.studies.saved import load  # noqa: E402

# model shapes (gpt2-style tiny_model) that reach >= 95 % in a few CPU minutes
FIRST_TOKEN_SHAPE = dict(n_layers=1, d_model=64, n_heads=2, d_head=32, d_mlp=256)
MIRROR_SHAPE = dict(n_layers=1, d_model=16, n_heads=2, d_head=8, d_mlp=32)
INDUCTION_SHAPE = dict(n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=32)


# --------------------------------------------------------------------------- training


def new_model(shape: dict, *, n_ctx: int, d_vocab: int, seed: int, dtype: torch.dtype = torch.float32) -> Model:
    """A gpt2-style ``tiny_model`` with the given shape (``FIRST_TOKEN_SHAPE`` etc.)."""
    return tiny_model("gpt2", n_ctx=n_ctx, d_vocab=d_vocab, seed=seed, dtype=dtype, **shape)


def train(
    model: Model,
    tokens: torch.Tensor,
    targets: torch.Tensor,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    weight_decay: float = 0.01,
    progress: bool = False,
) -> list[float]:
    """AdamW on the cross-entropy of ``targets`` at the last position; returns the loss per step.

    Batches are drawn with replacement from ``tokens`` by a generator seeded with ``seed`` (and
    ``torch.manual_seed(seed)``), so a run is deterministic. The model is left in eval mode.
    """
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    losses: list[float] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="train", leave=False)
    model.train()
    try:
        for step in range(steps):
            idx = torch.randint(0, tokens.shape[0], (batch_size,), generator=g)
            loss = F.cross_entropy(model(tokens[idx])[:, -1], targets[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if bar is not None:
                bar.update(1)
                if step % 50 == 0:
                    bar.set_postfix(loss=f"{loss.item():.3f}")
    finally:
        if bar is not None:
            bar.close()
        model.zero_grad(set_to_none=True)
        model.eval()
    return losses


@torch.no_grad()
def last_logits(model: Model, tokens: torch.Tensor, batch_size: int = 2048) -> torch.Tensor:
    """``[n, d_vocab]`` logits at the last position, in batches."""
    return torch.cat([model(tokens[i : i + batch_size])[:, -1] for i in range(0, tokens.shape[0], batch_size)])


def accuracy(model: Model, tokens: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of sequences whose top logit at the last position (whole vocabulary) is the target."""
    return float((last_logits(model, tokens).argmax(-1) == targets).float().mean())


def float64_copy(model: Model) -> Model:
    """A float64 copy of ``model`` (for the graph analysis; the original is untouched)."""
    with contextlib.redirect_stdout(io.StringIO()):  # TransformerLens prints the dtype change
        out = lens.copy_model(model).to(torch.float64)
    out.cfg.dtype = torch.float64
    return out.eval()


# --------------------------------------------------------------------------- heads


def head_flow(graph: GradGraph, flow: dict[str, torch.Tensor] | None = None, *, last_only: bool = False) -> torch.Tensor:
    """``[n_layers, n_heads]``: gradient flow through each head's ``hook_z`` (summed over d_head and
    over all positions, or at the last position only), averaged over the batch."""
    flow = gradient_flow(graph) if flow is None else flow
    where = slice(-1, None) if last_only else slice(None)
    return torch.stack(
        [flow[names.name("z", layer)][:, where].sum(dim=(1, 3)).mean(0) for layer in range(graph.n_layers)]
    ).cpu()


@torch.no_grad()
def attention_to(
    model: Model, tokens: torch.Tensor, key_pos: torch.Tensor, query_pos: int | torch.Tensor = -1
) -> torch.Tensor:
    """``[n_layers, n_heads]``: mean attention from ``query_pos[b]`` (default the last position)
    to ``key_pos[b]``."""
    patterns = [names.name("pattern", layer) for layer in range(model.cfg.n_layers)]
    with hooks.recording(model, names=set(patterns)) as store:
        model(tokens)
    rows = torch.arange(tokens.shape[0])
    query = torch.as_tensor(query_pos).expand(tokens.shape[0]) % tokens.shape[1]
    return torch.stack([store[name][0][rows, :, query, key_pos].mean(0) for name in patterns]).cpu()


@torch.no_grad()
def ablation_drop(
    model: Model, tokens: torch.Tensor, targets: torch.Tensor, *, last_only: bool = True
) -> torch.Tensor:
    """``[n_layers, n_heads]``: accuracy lost when one head's output (``hook_z``) is replaced by
    its mean over the batch (mean ablation), at the last position only or at every position."""
    base = accuracy(model, tokens, targets)
    out = torch.zeros(model.cfg.n_layers, model.cfg.n_heads)
    where = slice(-1, None) if last_only else slice(None)
    for layer in range(model.cfg.n_layers):
        for head in range(model.cfg.n_heads):

            def ablate(z: torch.Tensor, head: int = head) -> torch.Tensor:
                z = z.clone()
                z[:, where, head] = z[:, where, head].mean(0)
                return z

            with hooks.replacing(model, {names.name("z", layer): ablate}):
                logits = model(tokens)[:, -1]
            out[layer, head] = base - float((logits.argmax(-1) == targets).float().mean())
    return out


def _head_label(layer: int, head: int, n_heads: int) -> str:
    return Registry(layer + 1, n_heads, n_heads, ()).label(Component("head", layer, head))


def ranking(score: torch.Tensor) -> list[str]:
    """Head labels (``L1H0``) of a ``[layers, heads]`` score, from the highest score to the lowest."""
    n_heads = score.shape[1]
    return [_head_label(int(i) // n_heads, int(i) % n_heads, n_heads) for i in score.flatten().argsort(descending=True)]


# --------------------------------------------------------------------------- branches


def branch_top(graph: GradGraph, position: int, values: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """``[n_layers, 4]``: per branch (q, k, v, skip), the value of its own best path from the
    attention input at ``position`` to the metric (max over units and heads), averaged over the
    batch: the per-branch "top-path gradient" Du et al. compare."""
    values = backprop(graph, Max) if values is None else values
    out = torch.zeros(graph.n_layers, len(BRANCHES), dtype=torch.float64)
    reg = Registry.of(graph)
    for layer in range(graph.n_layers):
        nodes = reg.branch_nodes(layer)
        for i, node in enumerate(nodes[b] for b in BRANCHES):
            v = values[node][0][:, position].abs().double()  # [batch, (copies,) d]
            out[layer, i] = v.flatten(1).amax(1).mean().cpu()
    return out


def branch_table(graph: GradGraph, positions: dict[str, int]) -> list[dict]:
    """Rows ``{position, pos, layer, branch, share_oplus, share_bucket, top_value}`` for each named
    position (e.g. ``{"first": 0, "last": -1}``)."""
    values = backprop(graph, Max)
    rows = []
    for name, pos in positions.items():
        oplus = branch_shares(graph, pos, semiring=Max, agg="oplus", values=values)
        bucket = branch_shares(graph, pos, semiring=Max, agg="bucket_sum", values=values)
        top = branch_top(graph, pos, values)
        for layer in range(graph.n_layers):
            for i, branch in enumerate(BRANCHES):
                rows.append(dict(
                    position=name, pos=pos, layer=layer, branch=branch,
                    share_oplus=float(oplus.share[layer, i]), share_bucket=float(bucket.share[layer, i]),
                    top_value=float(top[layer, i]),
                ))
    return rows


# --------------------------------------------------------------------------- experiments


def first_token_graph(model: Model, tokens: torch.Tensor, labels: torch.Tensor, vocab: int) -> GradGraph:
    """The graph of logit(correct answer) − logit(wrong answer) at the last position (float64)."""
    no, _ = answer_ids(vocab)
    return build_graph(float64_copy(model), tokens, logit_diff(no + labels, no + 1 - labels, pos=-1))


def induction_graph(model: Model, tokens: torch.Tensor, targets: torch.Tensor) -> GradGraph:
    """The graph of logit(x_{i+1}) − logit(x_i) at the last position (float64): the answer against
    the token that a head attending to the matching position itself would copy."""
    return build_graph(float64_copy(model), tokens, logit_diff(targets, tokens[:, -1], pos=-1))


@dataclass
class FirstTokenConfig:
    """Training and measurement of one first-token-repeated model (``reverse``: read the tested
    token last). ``shape`` defaults to ``MIRROR_SHAPE`` reversed, ``FIRST_TOKEN_SHAPE`` otherwise."""

    seed: int = 0
    reverse: bool = False
    shape: dict | None = None
    seq_len: int = 10
    vocab: int = 20
    n_train: int = 10_000
    n_test: int = 2_000
    steps: int = 2_500
    lr: float = 1e-3
    batch_size: int = 128
    graph_batch: int = 64  # held-out sequences in the gradient graph
    progress: bool = False
    device: str = "cpu"  # where the model trains and runs (devices.choose)


def run_first_token(config: FirstTokenConfig) -> dict:
    """Train a one-layer model on ``first_token_repeated`` and measure its q/k/v/skip branches.

    Returns ``model``, ``losses``, ``seconds`` (training), ``shape``, ``train_accuracy``,
    ``test_accuracy`` (on the held-out sequences that do not occur in the training set,
    ``n_test_unseen`` of them) and ``branches`` (``branch_table`` rows at the first and last
    positions, on ``graph_batch`` held-out sequences).
    """
    c = config
    shape = dict(c.shape or (MIRROR_SHAPE if c.reverse else FIRST_TOKEN_SHAPE))
    x, y = first_token_repeated(c.n_train, seq_len=c.seq_len, vocab=c.vocab, seed=2 * c.seed + 1, reverse=c.reverse)
    xt, yt = first_token_repeated(c.n_test, seq_len=c.seq_len, vocab=c.vocab, seed=2 * c.seed + 2, reverse=c.reverse)
    keep = unseen(xt, x)
    device = devices.choose(c.device)
    x, y, xt, yt = (t.to(device) for t in (x, y, xt[keep], yt[keep]))
    no, _ = answer_ids(c.vocab)
    model = new_model(shape, n_ctx=c.seq_len, d_vocab=c.vocab + 2, seed=c.seed).to(device)
    start = time.perf_counter()
    losses = train(model, x, no + y, steps=c.steps, lr=c.lr, batch_size=c.batch_size, seed=c.seed, progress=c.progress)
    seconds = time.perf_counter() - start
    graph = first_token_graph(model, xt[: c.graph_batch], yt[: c.graph_batch], c.vocab)
    return dict(
        model=model, losses=losses, seconds=seconds, shape=shape,
        train_accuracy=accuracy(model, x, no + y), test_accuracy=accuracy(model, xt, no + yt),
        n_test_unseen=int(keep.sum()), branches=branch_table(graph, {"first": 0, "last": -1}),
    )


@dataclass
class InductionConfig:
    """Training and measurement of one induction model.

    Training has two phases: ``steps`` with weight decay 0.01 (the circuit forms), then
    ``prune_steps`` with ``prune_weight_decay`` (a head that is not needed decays; without it both
    layer-1 heads become induction heads and no single head is responsible)."""

    seed: int = 0
    shape: dict = field(default_factory=lambda: dict(INDUCTION_SHAPE))
    seq_len: int = 12
    vocab: int = 24
    n_train: int = 20_000
    n_test: int = 2_000
    steps: int = 1_200
    prune_steps: int = 1_000
    prune_weight_decay: float = 1.0
    lr: float = 3e-3
    batch_size: int = 128
    n_eval: int = 500  # sequences for attention and ablation
    graph_batch: int = 48  # sequences in the gradient graph
    progress: bool = False
    device: str = "cpu"  # where the model trains and runs (devices.choose)


def run_induction(config: InductionConfig) -> dict:
    """Train a two-layer model on ``induction``, then find the head that moves the answer.

    The responsible head is found without gradients, by its attention from the last position to the
    answer's position and by mean-ablating each head's output at the last position, and compared
    with the head that gradient flow ranks first (``head_flow`` summed over positions, on
    ``graph_batch`` sequences).
    """
    c = config
    x, y, _ = induction(c.n_train, seq_len=c.seq_len, vocab=c.vocab, seed=2 * c.seed + 1)
    xt, yt, src = induction(c.n_test, seq_len=c.seq_len, vocab=c.vocab, seed=2 * c.seed + 2)
    device = devices.choose(c.device)
    x, y, xt, yt, src = (t.to(device) for t in (x, y, xt, yt, src))
    model = new_model(c.shape, n_ctx=c.seq_len, d_vocab=c.vocab, seed=c.seed).to(device)
    start = time.perf_counter()
    losses = train(model, x, y, steps=c.steps, lr=c.lr, batch_size=c.batch_size, seed=c.seed, progress=c.progress)
    accuracy_before_pruning = accuracy(model, xt, yt)
    if c.prune_steps:
        losses += train(model, x, y, steps=c.prune_steps, lr=c.lr, batch_size=c.batch_size, seed=c.seed + 1,
                        weight_decay=c.prune_weight_decay, progress=c.progress)
    seconds = time.perf_counter() - start
    xe, ye, se = xt[: c.n_eval], yt[: c.n_eval], src[: c.n_eval]
    attention = attention_to(model, xe, se)
    previous_token = attention_to(model, xe, se - 1, se)  # from the answer's position to the one before
    drop_last = ablation_drop(model, xe, ye, last_only=True)
    drop_all = ablation_drop(model, xe, ye, last_only=False)
    graph = induction_graph(model, xe[: c.graph_batch], ye[: c.graph_batch])
    flows = gradient_flow(graph)
    flow = head_flow(graph, flows)
    flow_last = head_flow(graph, flows, last_only=True)
    top = {"attention": ranking(attention)[0], "ablation": ranking(drop_last)[0], "gradient_flow": ranking(flow)[0]}
    ordered = flow.flatten().sort(descending=True).values
    return dict(
        model=model, losses=losses, seconds=seconds, shape=c.shape,
        accuracy_before_pruning=accuracy_before_pruning,
        train_accuracy=accuracy(model, x, y), test_accuracy=accuracy(model, xt, yt),
        attention=attention, previous_token_attention=previous_token,
        previous_token_head=ranking(previous_token[:1])[0],  # the layer-0 head the induction head needs
        ablation_drop=drop_last, ablation_drop_all_positions=drop_all,
        flow=flow, flow_last_position=flow_last,
        flow_ranking=ranking(flow), flow_last_position_ranking=ranking(flow_last),
        top=top, agree=len(set(top.values())) == 1,
        flow_ratio=float(ordered[0] / ordered[1]),  # the top head's flow over the runner-up's
    )


# --------------------------------------------------------------------------- the study

# Du et al.'s released notebook (BERT-like bidirectional classifier): mean top-path gradient per branch
COMMAND = "gradgraph synthetic"
DU_ET_AL = {"k": 0.030, "q": 0.017, "skip": 0.0094, "v": 0.00095}


@dataclass
class Config:
    seed: int = 0  # seed of the first-token models
    steps: int = 3000  # training steps of the first-token model
    induction_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    out: str = "results/synthetic"
    figures: str = "figures"
    threads: int = 1  # tiny models run fastest on one thread; more threads on a busy CPU are far slower
    progress: bool = False  # tqdm progress bars while training
    device: str = "auto"  # where the models train and run: auto (a GPU when torch sees one, else the CPU), cpu, cuda


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


def run(config: Config) -> dict:
    """Train and measure every model, printing the tables as they come."""
    torch.set_num_threads(config.threads)
    start = time.perf_counter()
    print(f"[1/3] first token repeated, 1 layer {FIRST_TOKEN_SHAPE}, {config.steps} steps ...", flush=True)
    first = run_first_token(FirstTokenConfig(seed=config.seed, steps=config.steps, n_train=50_000,
                                             progress=config.progress, device=config.device))
    print(f"  accuracy train {first['train_accuracy']:.4f}, held-out {first['test_accuracy']:.4f} "
          f"({first['n_test_unseen']} unseen sequences); trained in {first['seconds']:.0f} s")
    print(shares_table("first token repeated", first["branches"]))
    print(f"[2/3] reversed sequences, 1 layer {MIRROR_SHAPE} ...", flush=True)
    mirror = run_first_token(FirstTokenConfig(seed=config.seed, reverse=True, steps=1000, lr=3e-3,
                                              progress=config.progress, device=config.device))
    print(f"  accuracy train {mirror['train_accuracy']:.4f}, held-out {mirror['test_accuracy']:.4f}; "
          f"trained in {mirror['seconds']:.0f} s")
    print(shares_table("reversed (tested token read last)", mirror["branches"]))
    print("  Du et al. (bidirectional, their model): mean top-path gradient " +
          ", ".join(f"{k.upper()} {v}" for k, v in DU_ET_AL.items()))
    heads = []
    for seed in config.induction_seeds:
        print(f"[3/3] induction, 2 layers {INDUCTION_SHAPE}, seed {seed} ...", flush=True)
        result = run_induction(InductionConfig(seed=seed, progress=config.progress, device=config.device))
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
    return dict(first=first, mirror=mirror, heads=heads, agree=agree, agree_last=agree_last,
                seconds=time.perf_counter() - start)


def plot_shares(first: dict, mirror: dict, heads: list[tuple[int, dict]], path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), gridspec_kw=dict(width_ratios=[1, 1, 1.2]))
    colors = {"first": "#4C72B0", "last": "#DD8452"}
    for ax, (title, result) in zip(axes[:2], (
        (f"first token repeated (1 layer, d_model {first['shape']['d_model']})\n"
         f"test accuracy {first['test_accuracy']:.3f}", first),
        (f"reversed: tested token read last (1 layer, d_model {mirror['shape']['d_model']})\n"
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
        i = labels.index(result["top"]["ablation"])
        ax.text(xs[i], ys[i] + 0.02, "*", ha="center", fontsize=12)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylim(0, 1.35)
    ax.set_ylabel("gradient flow through hook_z / max")
    ax.set_title("induction (2 layers): gradient flow per head\n* = head found by attention and ablation", fontsize=9)
    ax.legend(fontsize=8, ncols=len(heads), loc="upper center")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _jsonable(result: dict) -> dict:
    out = {key: value.tolist() if isinstance(value, torch.Tensor) else value
           for key, value in result.items() if key not in ("model", "losses")}
    out["final_loss"] = sum(result["losses"][-50:]) / len(result["losses"][-50:])
    return out


def _without_models(result: dict) -> dict:
    """What ``write`` reads of a result: everything but the trained models."""
    strip = lambda r: {k: v for k, v in r.items() if k != "model"}  # noqa: E731
    return dict(result, first=strip(result["first"]), mirror=strip(result["mirror"]),
                heads=[(seed, strip(r)) for seed, r in result["heads"]])


def _shares_csv(path, first: dict, mirror: dict) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["task", "position", "pos", "layer", "branch", "share_oplus",
                                         "share_bucket", "top_value"])
        writer.writeheader()
        for task, r in (("first_token", first), ("first_token_reversed", mirror)):
            for row in r["branches"]:
                writer.writerow(dict(task=task, **row))


def _heads_csv(path, heads: list) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["seed", "head", "attention_to_answer", "ablation_drop_last", "ablation_drop_all",
                         "flow_all_positions", "flow_last_position", "responsible", "previous_token_head"])
        for seed, r in heads:
            for layer in range(r["flow"].shape[0]):
                for head in range(r["flow"].shape[1]):
                    name = _head_label(layer, head, r["flow"].shape[1])
                    writer.writerow([seed, name, float(r["attention"][layer, head]),
                                     float(r["ablation_drop"][layer, head]),
                                     float(r["ablation_drop_all_positions"][layer, head]),
                                     float(r["flow"][layer, head]), float(r["flow_last_position"][layer, head]),
                                     name == r["top"]["ablation"], name == r["previous_token_head"]])


def write(config: Config, result: dict) -> None:
    """Save what was computed (not the trained models); stage the tables and the figure (each on its
    own) and publish them."""
    result = _without_models(result)
    first, mirror, heads = result["first"], result["mirror"], result["heads"]
    summary = dict(
        config=asdict(config), first_token=_jsonable(first), first_token_reversed=_jsonable(mirror),
        induction={str(seed): _jsonable(r) for seed, r in heads},
        induction_agree=result["agree"], induction_agree_last_position=result["agree_last"],
        induction_seeds=len(heads), du_et_al_top_path_gradient=DU_ET_AL, seconds=result["seconds"],
    )
    with staged_run(config.out, config.figures, COMMAND) as out:
        out.save(dict(config=config, result=result))
        out.make("summary.json", lambda: out.path("summary.json").write_text(json.dumps(summary, indent=1)))
        out.make("shares.csv", lambda: _shares_csv(out.path("shares.csv"), first, mirror))
        out.make("induction_heads.csv", lambda: _heads_csv(out.path("induction_heads.csv"), heads))
        def draw():
            path = out.figure("synthetic_shares.png")
            plot_shares(first, mirror, heads, path)
            return path

        figure = out.make("synthetic_shares.png", draw)
        final = out.final(figure) if figure else None
    print(f"wrote {config.out}/summary.json, shares.csv, induction_heads.csv and {final} "
          f"({result['seconds']:.0f} s in all)")


def redraw(out: str, figures: str | None = None) -> None:
    """Write the tables and the figure of the run saved in ``out`` again, without training
    (``gradgraph synthetic --redraw OUT``); the figure goes to ``figures`` (default: the run's)."""
    saved = load(out, command=COMMAND)
    config = saved["config"]
    config.out, config.figures = str(out), figures or config.figures
    write(config, saved["result"])


def main(config: Config) -> dict:
    """The synthetic validation (``gradgraph synthetic``): run, print, write."""
    result = run(config)
    write(config, result)
    return result
