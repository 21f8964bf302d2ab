"""Deletion metrics: which tokens are replaced, the shared-prefix probability, AOPC and log-odds."""

import math

import pytest
import torch

from gradgraph import GradGraphError, tiny_model
from gradgraph.faithfulness import LEVELS, deletion_scores, replaced, two_way_probability


def test_replaced_takes_the_top_candidates():
    tokens = torch.tensor([1, 10, 11, 12, 13, 14])
    scores = torch.tensor([9.0, 0.5, 3.0, -1.0, 3.0, 2.0])
    candidates = torch.tensor([False, True, True, True, True, True])  # never the BOS
    assert replaced(tokens, scores, candidates, 0.2, 0).tolist() == [1, 10, 0, 12, 13, 14]  # ceil(1.0) = 1; tie: earlier
    assert replaced(tokens, scores, candidates, 0.5, 0).tolist() == [1, 10, 0, 12, 0, 0]  # ceil(2.5) = 3
    assert replaced(tokens, scores, candidates, 0.0, 0).tolist() == tokens.tolist()
    assert LEVELS == (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    with pytest.raises(GradGraphError):
        replaced(tokens, scores, candidates, 1.5, 0)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_shared_prefix_probability_equals_full_runs(arch):
    model = tiny_model(arch, dtype=torch.float64, seed=1)
    generator = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 50, (1, 12), generator=generator).repeat(5, 1)
    rows[:, 7:] = torch.randint(0, 50, (5, 5), generator=generator)
    rows[2, 9] = 0  # a replaced token is a token, not padding
    with torch.no_grad():
        logits = model(rows)[:, -1]
    expected = torch.sigmoid(logits[:, 1] - logits[:, 2])
    assert torch.allclose(two_way_probability(model, rows, 1, 2, prefix=7), expected, atol=1e-12)
    assert torch.allclose(two_way_probability(model, rows, 1, 2), expected, atol=1e-12)
    with pytest.raises(GradGraphError, match="prefix"):
        two_way_probability(model, rows, 1, 2, prefix=8)
    assert model.cfg.use_split_qkv_input and model.cfg.use_hook_mlp_in  # plain forwards inside only


def test_aopc_and_log_odds():
    p = torch.tensor([0.8, 0.5], dtype=torch.float64)
    deleted = torch.tensor([[0.4, 0.2], [0.5, 0.25]], dtype=torch.float64)
    out = deletion_scores(p, deleted)
    assert out["aopc"] == pytest.approx((0.4 + 0.6 + 0.0 + 0.25) / 4)
    assert out["log_odds"] == pytest.approx((math.log(0.5) + math.log(0.25) + 0 + math.log(0.5)) / 4)
    assert out["aopc_by_level"] == pytest.approx([0.2, 0.425])
