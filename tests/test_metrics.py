"""Metrics and prompt handling: values, padding, and clear errors."""

import pytest
import torch

from gradgraph import GradGraphError, backprop, build_graph, tiny_model
from gradgraph.metrics import logit_diff, logprob_diff, prepare
from gradgraph.prompts import single_token_id, to_tokens

from conftest import no_hooks_left


def test_logit_diff_values_and_batch_ids():
    logits = torch.randn(3, 5, 10)
    m = logit_diff(2, 7)
    assert torch.allclose(m(logits), logits[:, -1, 2] - logits[:, -1, 7])
    good, bad = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])
    expected = logits[torch.arange(3), -1, good] - logits[torch.arange(3), -1, bad]
    assert torch.allclose(logit_diff(good, bad)(logits), expected)
    assert torch.allclose(logit_diff(2, 7, pos=1)(logits), logits[:, 1, 2] - logits[:, 1, 7])


def test_logprob_diff_is_shift_invariant():
    logits = torch.randn(2, 4, 10)
    m = logprob_diff(1, 3)
    lp = logits.log_softmax(-1)
    assert torch.allclose(m(logits), lp[:, -1, 1] - lp[:, -1, 3])
    assert torch.allclose(m(logits + 5.0), m(logits), atol=1e-5)


def test_padding_aware_last_position():
    logits = torch.randn(2, 6, 10)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    out = logit_diff(0, 1)(logits, mask)
    assert torch.allclose(out, torch.stack([logits[0, 5, 0] - logits[0, 5, 1], logits[1, 2, 0] - logits[1, 2, 1]]))
    out = logit_diff(0, 1, pos=-2)(logits, mask)
    assert torch.allclose(out[1], logits[1, 1, 0] - logits[1, 1, 1])


def test_metric_position_outside_prompt():
    logits = torch.randn(2, 6, 10)
    mask = torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0]])
    with pytest.raises(GradGraphError, match="outside prompt 1, which has 3 tokens"):
        logit_diff(0, 1, pos=4)(logits, mask)
    with pytest.raises(GradGraphError, match="outside prompt 0"):
        logit_diff(0, 1, pos=-7)(logits)


def test_metric_bad_ids():
    with pytest.raises(GradGraphError, match="out of range"):
        logit_diff(0, 99)(torch.randn(1, 3, 10))
    with pytest.raises(GradGraphError, match="one id per prompt"):
        logit_diff(torch.tensor([0, 1]), 2)(torch.randn(3, 3, 10))
    with pytest.raises(GradGraphError, match="token id"):
        logit_diff(1.5, 2)
    words = logit_diff(" are", 2)
    with pytest.raises(GradGraphError, match="names words"):
        words(torch.randn(1, 3, 10))
    with pytest.raises(GradGraphError, match="no tokenizer"):
        prepare(words, tiny_model("gpt2"))


def test_plain_metric_functions_are_accepted():
    """A function of the logits alone is what a user writes first: it builds the same graph."""
    model = tiny_model("gpt2", dtype=torch.float64)
    tokens = torch.tensor([[3, 4, 5, 6], [7, 8, 9, 10]])
    plain = build_graph(model, tokens, lambda logits: logits[:, -1, 1] - logits[:, -1, 2])
    builder = build_graph(model, tokens, logit_diff(1, 2))
    assert torch.equal(plain.metric_value, builder.metric_value)
    assert torch.equal(backprop(plain)["hook_embed"], backprop(builder)["hook_embed"])
    with pytest.raises(GradGraphError, match="takes no arguments"):
        build_graph(model, tokens, lambda: 0)
    with pytest.raises(GradGraphError, match=r"one value per prompt, shape \[2\]"):
        build_graph(model, tokens, lambda logits: logits[:, -1])
    assert no_hooks_left(model)


def test_to_tokens_checks():
    model = tiny_model("gpt2", n_ctx=8)
    with pytest.raises(GradGraphError, match="longer than the model's context"):
        to_tokens(model, torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(GradGraphError, match="non-empty"):
        to_tokens(model, torch.zeros(0, 3, dtype=torch.long))
    with pytest.raises(GradGraphError, match="no tokenizer"):
        to_tokens(model, "hello")
    tokens, mask = to_tokens(model, torch.tensor([[1, 2, 3]]))
    assert mask.sum() == 3


@pytest.mark.real
def test_prompts_on_the_real_tokenizer(smol_model):
    tokens, mask = to_tokens(smol_model, ["The key", "The keys to the cabinet"])
    assert mask.sum(-1).tolist() == [3, 6] and tokens[0, 0] == smol_model.tokenizer.bos_token_id
    with pytest.raises(GradGraphError, match="prompt 1 is empty"):
        to_tokens(smol_model, ["The key", "  "])
    with pytest.raises(GradGraphError, match="no prompts"):
        to_tokens(smol_model, [])
    with pytest.raises(GradGraphError, match="longer than the model's context"):
        to_tokens(smol_model, "word " * 9000)  # past SmolLM2's 8,192 tokens
    assert single_token_id(smol_model.tokenizer, " are") == smol_model.tokenizer.encode(" are", add_special_tokens=False)[0]
    with pytest.raises(GradGraphError, match="not one"):
        single_token_id(smol_model.tokenizer, " antidisestablishmentarianism")


@pytest.mark.real
def test_padded_batch_equals_single_prompts(smol_model):
    """Right padding leaves every prompt's metric exactly as when run alone."""
    prompts = ["The key", "The keys to the old cabinet"]
    tokens, mask = to_tokens(smol_model, prompts)
    metric = logit_diff(359, 314)
    batched = metric(smol_model(tokens), mask)
    for i, prompt in enumerate(prompts):
        alone, _ = to_tokens(smol_model, prompt)
        assert torch.allclose(metric(smol_model(alone)), batched[i : i + 1], atol=1e-4)


@pytest.mark.real
def test_metrics_take_words(smol_model):
    tokens, mask = to_tokens(smol_model, ["The keys to the cabinet", "The key to the cabinets"])
    by_word = build_graph(smol_model, tokens, logit_diff(" are", " is"), attention_mask=mask)
    by_id = build_graph(smol_model, tokens, logit_diff(359, 314), attention_mask=mask)
    assert torch.equal(by_word.metric_value, by_id.metric_value)
    assert by_word.metric_value[0] > 0 > by_word.metric_value[1]  # " are" after "keys", " is" after "key"
    per_prompt = prepare(logprob_diff([" are", " is"], [" is", " are"]), smol_model)
    assert (per_prompt(smol_model(tokens), mask) > 0).all()
    with pytest.raises(GradGraphError, match="not one"):
        build_graph(smol_model, tokens, logit_diff(" antidisestablishmentarianism", " is"), attention_mask=mask)
