"""Synthetic validation (Du et al. 2023, §5.1), small and fast: the data generators are right, a
one-layer model learns first-token-repeated, its q/k/v/skip shares are well formed, and gradient
flow finds the head that an induction task makes responsible by construction.

Models are trained on one thread: tiny models gain nothing from more, and on a busy CPU two
threads made training about a hundred times slower."""

import pytest
import torch

from gradgraph.branches import BRANCHES
from gradgraph.data import synthetic as tasks
from gradgraph.errors import GradGraphError
from gradgraph.studies import synthetic


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def share(rows, position, branch, key="share_oplus"):
    return next(r[key] for r in rows if r["position"] == position and r["branch"] == branch)


# --------------------------------------------------------------------------- data


@pytest.mark.parametrize("reverse", [False, True])
def test_first_token_data_is_balanced_and_labelled_right(reverse):
    tokens, labels = tasks.first_token_repeated(1001, seq_len=10, vocab=20, seed=3, reverse=reverse)
    assert tokens.shape == (1001, 10) and labels.shape == (1001,)
    assert int(labels.sum()) == 500  # balanced: n // 2 ones
    assert tokens.min() >= 1 and tokens.max() <= 19  # 0 (padding in Du et al.) never used
    seqs = tokens.flip(-1) if reverse else tokens
    repeats = (seqs[:, 1:] == seqs[:, :1]).sum(-1)
    assert torch.equal((repeats > 0).long(), labels)  # "no" sequences never repeat the first token
    assert (repeats[labels == 1] == 1).all()  # "yes" sequences repeat it exactly once
    # the repeat lands anywhere after the first token, and every token value occurs
    where = (seqs[:, 1:] == seqs[:, :1]).long().argmax(-1)[labels == 1]
    assert set(where.tolist()) == set(range(9))
    assert set(tokens.flatten().tolist()) == set(range(1, 20))
    again, _ = tasks.first_token_repeated(1001, seq_len=10, vocab=20, seed=3, reverse=reverse)
    assert torch.equal(again, tokens)


def test_answer_ids_and_bad_arguments():
    assert tasks.answer_ids(20) == (20, 21)
    with pytest.raises(GradGraphError):
        tasks.first_token_repeated(10, vocab=2)
    with pytest.raises(GradGraphError):
        tasks.induction(10, seq_len=12, vocab=5)


def test_induction_data():
    tokens, targets, source = tasks.induction(500, seq_len=8, vocab=16, seed=1)
    rows = torch.arange(500)
    prefix = tokens[:, :-1]
    assert all(len(set(r)) == len(r) for r in prefix.tolist())  # distinct: the match is unique
    assert torch.equal(tokens[rows, source - 1], tokens[:, -1])  # the last token repeats x_i ...
    assert torch.equal(tokens[rows, source], targets)  # ... and the answer is x_{i+1}
    assert source.min() >= 1 and source.max() <= 6  # never the last position itself
    assert set(source.tolist()) == set(range(1, 7))


def test_unseen_drops_training_sequences():
    seen = torch.tensor([[1, 2], [3, 4]])
    assert tasks.unseen(torch.tensor([[1, 2], [2, 1], [3, 4]]), seen).tolist() == [False, True, False]


# --------------------------------------------------------------------------- first token repeated


def check_branch_rows(rows):
    for position in ("first", "last"):
        for key in ("share_oplus", "share_bucket"):
            total = sum(share(rows, position, b, key) for b in BRANCHES)
            assert total == pytest.approx(1.0, abs=1e-9), (position, key)
    # one layer: position 0's query and skip only reach position 0's own logits, never the metric
    # read at the last position; only its key and value do
    for key in ("share_oplus", "share_bucket", "top_value"):
        assert share(rows, "first", "q", key) == 0 and share(rows, "first", "skip", key) == 0
    assert share(rows, "first", "k", "top_value") > 0 and share(rows, "first", "v", "top_value") > 0


@pytest.mark.slow
def test_first_token_model_learns_and_has_branch_shares(one_thread):
    """The forward task (the first token is not at the reading position) on a small vocabulary."""
    result = synthetic.run_first_token(synthetic.FirstTokenConfig(seed=0, seq_len=6, vocab=7, steps=1000, lr=2e-3,
                                                                  n_test=1000, graph_batch=32))
    assert result["n_test_unseen"] > 500
    assert result["test_accuracy"] >= 0.9, result["test_accuracy"]
    check_branch_rows(result["branches"])


@pytest.mark.slow
def test_reversed_first_token_model_learns_and_has_branch_shares(one_thread):
    """Du et al.'s shapes (vocabulary 20, length 10, d_model 16, 2 heads), tested token read last."""
    result = synthetic.run_first_token(synthetic.FirstTokenConfig(seed=0, reverse=True, steps=800, lr=3e-3,
                                                                  n_test=1000, graph_batch=32))
    assert result["shape"]["d_model"] == 16
    assert result["test_accuracy"] >= 0.95, result["test_accuracy"]
    check_branch_rows(result["branches"])
    # the reading position looks its own token up: its query branch carries top paths
    assert share(result["branches"], "last", "q", "top_value") > 0


# --------------------------------------------------------------------------- known head


@pytest.mark.slow
def test_gradient_flow_ranks_the_induction_head_first(one_thread):
    """The head that moves the answer is found by attention and by ablation, without gradients,
    and gradient flow ranks it first.

    Seed 0 of this small configuration; in seed 1 (not tested) gradient flow summed over positions
    ranks the previous-token head first (by 1.18x), which the induction head depends on; at the
    last position it still ranks the induction head first. `gradgraph synthetic` runs three seeds
    at full size."""
    result = synthetic.run_induction(synthetic.InductionConfig(seed=0, seq_len=8, vocab=16, steps=800, prune_steps=600,
                                                               batch_size=64, n_train=10_000, n_eval=300, graph_batch=32))
    assert result["test_accuracy"] >= 0.9
    head = result["top"]["ablation"]
    layer, index = int(head[1]), int(head[3])
    assert layer == 1  # by construction only a layer-1 head can move x_{i+1} to the last position
    # identified without gradients, unambiguously: it attends to the answer and nothing else carries it
    assert result["top"]["attention"] == head
    assert result["attention"][layer, index] > 0.5
    drop = result["ablation_drop"].clone()
    assert drop[layer, index] > 0.5
    drop[layer, index] = 0
    assert drop.max() < 0.1
    # the previous-token head it needs sits in layer 0
    assert result["previous_token_head"].startswith("L0")
    # gradient flow ranks it first, summed over positions and at the last position
    assert result["flow_ranking"][0] == head, result["flow_ranking"]
    assert result["flow_last_position_ranking"][0] == head
    assert result["agree"]


def test_write_saves_the_results_and_redraw_draws_them_again(tmp_path, monkeypatch, one_thread):
    """What the synthetic study trained and measured survives a figure that fails, and --redraw
    writes the figure from the saved results (no model is saved or needed)."""
    from gradgraph.cli import main
    from gradgraph.errors import OutputIncomplete

    small = dict(steps=20, n_train=400, n_test=200, graph_batch=8)
    first = synthetic.run_first_token(synthetic.FirstTokenConfig(seed=0, **small))
    mirror = synthetic.run_first_token(synthetic.FirstTokenConfig(seed=0, reverse=True, **small))
    induction = synthetic.run_induction(synthetic.InductionConfig(seed=0, seq_len=8, vocab=16, steps=20, prune_steps=10,
                                                                  n_train=400, n_eval=50, graph_batch=8))
    result = dict(first=first, mirror=mirror, heads=[(0, induction)], agree=int(induction["agree"]),
                  agree_last=0, seconds=1.0)
    config = synthetic.Config(out=str(tmp_path / "out"), figures=str(tmp_path / "out" / "figures"))

    def broken(*args):
        raise RuntimeError("no figure today")

    monkeypatch.setattr(synthetic, "plot_shares", broken)
    with pytest.raises(OutputIncomplete, match="synthetic_shares.png: RuntimeError: no figure today"):
        synthetic.write(config, result)
    assert (tmp_path / "out" / "shares.csv").is_file()
    assert not (tmp_path / "out" / "figures" / "synthetic_shares.png").exists()
    shares = (tmp_path / "out" / "shares.csv").read_text()
    monkeypatch.undo()
    assert main(["synthetic", "--redraw", str(tmp_path / "out"), "--figures", str(tmp_path / "out" / "figures")]) == 0
    assert (tmp_path / "out" / "figures" / "synthetic_shares.png").stat().st_size > 1000
    assert (tmp_path / "out" / "shares.csv").read_text() == shares
