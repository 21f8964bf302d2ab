"""Synthetic validation (Du et al. 2023, §5.1): small models trained on tasks with a known answer.

Two tasks, each read at the last position of a causal model:

- ``first_token_repeated``: does the first token occur again? (Du et al.'s FirstTokenRepeatedOnce:
  vocabulary 1..vocab-1, balanced labels, a "yes" sequence repeats the first token exactly once.)
  The model answers with one of two extra token ids, ``answer_ids(vocab) = (no, yes) = (vocab,
  vocab + 1)``, so its ``d_vocab`` is ``vocab + 2``. With ``reverse=True`` every sequence is
  flipped: the tested token sits at the reading position, the causal mirror of Du et al.'s
  bidirectional model, in which the first token's own position looks up its repeat (q·k).
  In the forward order a one-layer causal model cannot compare tokens (no position knows the
  first token before the attention layer); it has to read the first token and a bag of the others
  and compare them in the MLP, which takes a wider model (``FIRST_TOKEN_CONFIG``).
- ``induction``: distinct random tokens, the last one a copy of an earlier token x_i; the answer
  is x_{i+1}. In a two-layer model only a layer-1 head can move x_{i+1} to the last position
  (attending to position i+1, which it finds through a layer-0 previous-token head), so the
  responsible head is known by construction and can be found without gradients: by its attention
  from the last position and by ablating its output there.

``head_flow`` ranks heads by gradient flow (``gradient_flow`` through ``hook_z``), ``branch_table``
gives the q / k / v / skip shares of ``branch_shares`` and each branch's own top-path value.
"""

from __future__ import annotations

import contextlib
import copy
import io
import time

import torch
import torch.nn.functional as F
from transformer_lens import HookedTransformer

from gradgraph import hooks
from gradgraph.backprop import backprop
from gradgraph.build import build_graph
from gradgraph.components import BRANCHES, branch_shares
from gradgraph.errors import GradGraphError
from gradgraph.graph import GradGraph
from gradgraph.metrics import logit_diff
from gradgraph.models import tiny_model
from gradgraph.paths import gradient_flow
from gradgraph.semirings import Max

# model shapes (gpt2-style tiny_model) that reach >= 95 % in a few CPU minutes
FIRST_TOKEN_CONFIG = dict(n_layers=1, d_model=64, n_heads=2, d_head=32, d_mlp=256)
MIRROR_CONFIG = dict(n_layers=1, d_model=16, n_heads=2, d_head=8, d_mlp=32)
INDUCTION_CONFIG = dict(n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=32)


# --------------------------------------------------------------------------- data


def answer_ids(vocab: int) -> tuple[int, int]:
    """The (no, yes) answer token ids of the first-token task: ``(vocab, vocab + 1)``."""
    return vocab, vocab + 1


def first_token_repeated(
    n: int, *, seq_len: int = 10, vocab: int = 20, seed: int = 0, reverse: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens [n, seq_len], labels [n])``: label 1 iff ``tokens[0]`` occurs again in ``tokens[1:]``.

    Tokens lie in ``1..vocab-1`` (0 is never used); labels are balanced (``n // 2`` ones, shuffled).
    A "no" sequence draws its other tokens from the vocabulary without the first token; a "yes"
    sequence does the same and then puts the first token at one random later position. With
    ``reverse`` each sequence is flipped (the label then says whether the *last* token occurs
    earlier).
    """
    if n < 2 or seq_len < 2 or vocab < 3:
        raise GradGraphError(f"first_token_repeated needs n >= 2, seq_len >= 2, vocab >= 3; got {n}, {seq_len}, {vocab}")
    g = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) < n // 2).long()[torch.randperm(n, generator=g)]
    first = torch.randint(1, vocab, (n,), generator=g)
    rest = torch.randint(1, vocab - 1, (n, seq_len - 1), generator=g)
    rest = rest + (rest >= first[:, None]).long()  # uniform over 1..vocab-1 without `first`
    where = torch.randint(0, seq_len - 1, (n,), generator=g)
    yes = labels.bool()
    rest[yes, where[yes]] = first[yes]
    tokens = torch.cat([first[:, None], rest], 1)
    return (tokens.flip(-1) if reverse else tokens), labels


def induction(
    n: int, *, seq_len: int = 12, vocab: int = 24, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(tokens [n, seq_len], targets [n], source [n])`` for in-context copying (induction).

    ``tokens[:, :-1]`` are distinct tokens from ``0..vocab-1``; the last token repeats the one at
    a random position i ≤ seq_len − 3; the target is the token after it, at ``source = i + 1``.
    """
    if seq_len < 3 or vocab < seq_len - 1:
        raise GradGraphError(f"induction needs seq_len >= 3 and vocab >= seq_len - 1; got {seq_len}, {vocab}")
    g = torch.Generator().manual_seed(seed)
    prefix = torch.rand(n, vocab, generator=g).argsort(-1)[:, : seq_len - 1]
    trigger = torch.randint(0, seq_len - 2, (n,), generator=g)
    rows = torch.arange(n)
    tokens = torch.cat([prefix, prefix[rows, trigger][:, None]], 1)
    return tokens, prefix[rows, trigger + 1], trigger + 1


# --------------------------------------------------------------------------- training


def new_model(config: dict, *, n_ctx: int, d_vocab: int, seed: int, dtype: torch.dtype = torch.float32) -> HookedTransformer:
    """A gpt2-style ``tiny_model`` with the given shape (``FIRST_TOKEN_CONFIG`` etc.)."""
    return tiny_model("gpt2", n_ctx=n_ctx, d_vocab=d_vocab, seed=seed, dtype=dtype, **config)


def train(
    model: HookedTransformer,
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
def last_logits(model: HookedTransformer, tokens: torch.Tensor, batch_size: int = 2048) -> torch.Tensor:
    """``[n, d_vocab]`` logits at the last position, in batches."""
    return torch.cat([model(tokens[i : i + batch_size])[:, -1] for i in range(0, tokens.shape[0], batch_size)])


def accuracy(model: HookedTransformer, tokens: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of sequences whose top logit at the last position (whole vocabulary) is the target."""
    return float((last_logits(model, tokens).argmax(-1) == targets).float().mean())


def unseen(tokens: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """``[n]`` bool: which rows of ``tokens`` are not rows of ``seen`` (held-out data without
    the sequences that also occur in the training set)."""
    known = {tuple(row) for row in seen.tolist()}
    return torch.tensor([tuple(row) not in known for row in tokens.tolist()], dtype=torch.bool)


def float64_copy(model: HookedTransformer) -> HookedTransformer:
    """A float64 copy of ``model`` (for the graph analysis; the original is untouched)."""
    with contextlib.redirect_stdout(io.StringIO()):  # TransformerLens prints the dtype change
        out = copy.deepcopy(model).to(torch.float64)
    out.cfg.dtype = torch.float64
    return out.eval()


# --------------------------------------------------------------------------- heads


def head_flow(graph: GradGraph, flow: dict[str, torch.Tensor] | None = None, *, last_only: bool = False) -> torch.Tensor:
    """``[n_layers, n_heads]``: gradient flow through each head's ``hook_z`` (summed over d_head and
    over all positions, or at the last position only), averaged over the batch."""
    flow = gradient_flow(graph) if flow is None else flow
    where = slice(-1, None) if last_only else slice(None)
    return torch.stack(
        [flow[hooks.name("z", layer)][:, where].sum(dim=(1, 3)).mean(0) for layer in range(graph.n_layers)]
    ).cpu()


@torch.no_grad()
def attention_to(
    model: HookedTransformer, tokens: torch.Tensor, key_pos: torch.Tensor, query_pos: int | torch.Tensor = -1
) -> torch.Tensor:
    """``[n_layers, n_heads]``: mean attention from ``query_pos[b]`` (default the last position)
    to ``key_pos[b]``."""
    names = [hooks.name("pattern", layer) for layer in range(model.cfg.n_layers)]
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    rows = torch.arange(tokens.shape[0])
    query = torch.as_tensor(query_pos).expand(tokens.shape[0]) % tokens.shape[1]
    return torch.stack(
        [cache[name][rows, :, query, key_pos].mean(0) for name in names]
    ).cpu()


@torch.no_grad()
def ablation_drop(
    model: HookedTransformer, tokens: torch.Tensor, targets: torch.Tensor, *, last_only: bool = True
) -> torch.Tensor:
    """``[n_layers, n_heads]``: accuracy lost when one head's output (``hook_z``) is replaced by
    its mean over the batch (mean ablation), at the last position only or at every position."""
    base = accuracy(model, tokens, targets)
    out = torch.zeros(model.cfg.n_layers, model.cfg.n_heads)
    where = slice(-1, None) if last_only else slice(None)
    for layer in range(model.cfg.n_layers):
        for head in range(model.cfg.n_heads):

            def ablate(z: torch.Tensor, hook, head: int = head) -> torch.Tensor:
                z = z.clone()
                z[:, where, head] = z[:, where, head].mean(0)
                return z

            logits = model.run_with_hooks(tokens, fwd_hooks=[(hooks.name("z", layer), ablate)])[:, -1]
            out[layer, head] = base - float((logits.argmax(-1) == targets).float().mean())
    return out


def ranking(score: torch.Tensor) -> list[str]:
    """Head labels ``L{layer}H{head}`` from the highest score to the lowest."""
    n_heads = score.shape[1]
    return [f"L{int(i) // n_heads}H{int(i) % n_heads}" for i in score.flatten().argsort(descending=True)]


# --------------------------------------------------------------------------- branches


def branch_top(graph: GradGraph, position: int, values: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """``[n_layers, 4]``: per branch (q, k, v, skip), the value of its own best path from the
    attention input at ``position`` to the metric (max over units and heads), averaged over the
    batch: the per-branch "top-path gradient" Du et al. compare."""
    values = backprop(graph, Max) if values is None else values
    out = torch.zeros(graph.n_layers, len(BRANCHES), dtype=torch.float64)
    for layer in range(graph.n_layers):
        nodes = [hooks.name(f"{c}_input", layer) for c in ("q", "k", "v")] + [hooks.name("resid_mid", layer)]
        for i, node in enumerate(nodes):
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


def first_token_graph(model: HookedTransformer, tokens: torch.Tensor, labels: torch.Tensor, vocab: int) -> GradGraph:
    """The graph of logit(correct answer) − logit(wrong answer) at the last position (float64)."""
    no, _ = answer_ids(vocab)
    return build_graph(float64_copy(model), tokens, logit_diff(no + labels, no + 1 - labels, pos=-1))


def induction_graph(model: HookedTransformer, tokens: torch.Tensor, targets: torch.Tensor) -> GradGraph:
    """The graph of logit(x_{i+1}) − logit(x_i) at the last position (float64): the answer against
    the token that a head attending to the matching position itself would copy."""
    return build_graph(float64_copy(model), tokens, logit_diff(targets, tokens[:, -1], pos=-1))


def run_first_token(
    *,
    seed: int = 0,
    reverse: bool = False,
    config: dict | None = None,
    seq_len: int = 10,
    vocab: int = 20,
    n_train: int = 10_000,
    n_test: int = 2_000,
    steps: int = 2_500,
    lr: float = 1e-3,
    batch_size: int = 128,
    graph_batch: int = 64,
    progress: bool = False,
) -> dict:
    """Train a one-layer model on ``first_token_repeated`` and measure its q/k/v/skip branches.

    Returns ``model``, ``losses``, ``seconds`` (training), ``train_accuracy``, ``test_accuracy``
    (on the held-out sequences that do not occur in the training set, ``n_test_unseen`` of them)
    and ``branches`` (``branch_table`` rows at the first and last positions, on ``graph_batch``
    held-out sequences).
    """
    config = dict(config or (MIRROR_CONFIG if reverse else FIRST_TOKEN_CONFIG))
    x, y = first_token_repeated(n_train, seq_len=seq_len, vocab=vocab, seed=2 * seed + 1, reverse=reverse)
    xt, yt = first_token_repeated(n_test, seq_len=seq_len, vocab=vocab, seed=2 * seed + 2, reverse=reverse)
    keep = unseen(xt, x)
    xt, yt = xt[keep], yt[keep]
    no, _ = answer_ids(vocab)
    model = new_model(config, n_ctx=seq_len, d_vocab=vocab + 2, seed=seed)
    start = time.perf_counter()
    losses = train(model, x, no + y, steps=steps, lr=lr, batch_size=batch_size, seed=seed, progress=progress)
    seconds = time.perf_counter() - start
    graph = first_token_graph(model, xt[:graph_batch], yt[:graph_batch], vocab)
    return dict(
        model=model, losses=losses, seconds=seconds, config=config,
        train_accuracy=accuracy(model, x, no + y), test_accuracy=accuracy(model, xt, no + yt),
        n_test_unseen=int(keep.sum()), branches=branch_table(graph, {"first": 0, "last": -1}),
    )


def run_induction(
    *,
    seed: int = 0,
    config: dict | None = None,
    seq_len: int = 12,
    vocab: int = 24,
    n_train: int = 20_000,
    n_test: int = 2_000,
    steps: int = 1_200,
    prune_steps: int = 1_000,
    prune_weight_decay: float = 1.0,
    lr: float = 3e-3,
    batch_size: int = 128,
    n_eval: int = 500,
    graph_batch: int = 48,
    progress: bool = False,
) -> dict:
    """Train a two-layer model on ``induction``, then find the head that moves the answer.

    Training has two phases: ``steps`` with weight decay 0.01 (the circuit forms), then
    ``prune_steps`` with ``prune_weight_decay`` (a head that is not needed decays; without it both
    layer-1 heads become induction heads and no single head is responsible). The responsible head
    is found without gradients, by its attention from the last position to the answer's position
    and by mean-ablating each head's output at the last position, and compared with the head that
    gradient flow ranks first (``head_flow`` summed over positions, on ``graph_batch`` sequences).
    """
    config = dict(config or INDUCTION_CONFIG)
    x, y, _ = induction(n_train, seq_len=seq_len, vocab=vocab, seed=2 * seed + 1)
    xt, yt, src = induction(n_test, seq_len=seq_len, vocab=vocab, seed=2 * seed + 2)
    model = new_model(config, n_ctx=seq_len, d_vocab=vocab, seed=seed)
    start = time.perf_counter()
    losses = train(model, x, y, steps=steps, lr=lr, batch_size=batch_size, seed=seed, progress=progress)
    accuracy_before_pruning = accuracy(model, xt, yt)
    if prune_steps:
        losses += train(model, x, y, steps=prune_steps, lr=lr, batch_size=batch_size, seed=seed + 1,
                        weight_decay=prune_weight_decay, progress=progress)
    seconds = time.perf_counter() - start
    xe, ye, se = xt[:n_eval], yt[:n_eval], src[:n_eval]
    attention = attention_to(model, xe, se)
    previous_token = attention_to(model, xe, se - 1, se)  # from the answer's position to the one before
    drop_last = ablation_drop(model, xe, ye, last_only=True)
    drop_all = ablation_drop(model, xe, ye, last_only=False)
    graph = induction_graph(model, xe[:graph_batch], ye[:graph_batch])
    flows = gradient_flow(graph)
    flow = head_flow(graph, flows)
    flow_last = head_flow(graph, flows, last_only=True)
    top = {"attention": ranking(attention)[0], "ablation": ranking(drop_last)[0], "gradient_flow": ranking(flow)[0]}
    ordered = flow.flatten().sort(descending=True).values
    return dict(
        model=model, losses=losses, seconds=seconds, config=config,
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
