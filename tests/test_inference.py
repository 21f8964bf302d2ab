"""Output-only forward passes (``gradgraph.arch.inference``) against the model's own forward, and the
deletion probabilities built on them."""

import pytest
import torch

from conftest import no_hooks_left
from gradgraph import tiny_model
from gradgraph.arch import inference, names
from gradgraph.faithfulness import Example, measure, measure_all, probabilities


def _rows(seed: int, n: int = 30, length: int = 14, shared: int = 5) -> torch.Tensor:
    """Rows that share their first ``shared`` tokens and differ by a few replaced tokens after."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(1, 50, (1, length), generator=generator).repeat(n, 1)
    for i in range(1, n):
        k = int(torch.randint(1, 4, (1,), generator=generator))
        rows[i, torch.randint(shared, length, (k,), generator=generator)] = 0
    return rows


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_run_equals_the_models_forward(arch):
    model = tiny_model(arch, dtype=torch.float64, n_layers=3, seed=2)
    rows = _rows(0)
    with torch.no_grad():
        expected = model(rows, stop_at_layer=model.cfg.n_layers)
    resid, kv = inference.run(model, rows, keep=True)
    assert torch.allclose(resid, expected, atol=1e-12)
    assert len(kv.keys) == model.cfg.n_layers and kv.keys[0].shape == (model.cfg.n_key_value_heads or 4, 30, 14, 4)
    last, _ = inference.run(model, rows, last_only=True)
    assert torch.allclose(last[:, 0], expected[:, -1], atol=1e-12)
    # the same positions from the keys and values of a run of the first six tokens
    head, early = inference.run(model, rows[:, :6], keep=True)
    tail, _ = inference.run(model, rows[:, 6:], past=early)
    assert torch.allclose(torch.cat([head, tail], 1), expected, atol=1e-12)
    assert model.cfg.use_split_qkv_input  # nothing changed on the model


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("segments", [1, 3, 20])
def test_last_logits_with_a_prefix_and_a_tree_of_spans(arch, segments):
    model = tiny_model(arch, dtype=torch.float64, n_layers=2, seed=1, n_heads=4, n_key_value_heads=2)
    rows = _rows(1)
    ids = torch.tensor([3, 7, 11])
    with torch.no_grad():
        expected = model(rows)[:, -1, ids]
    for prefix in (0, 1, 5):
        got = inference.last_logits(model, rows, ids, prefix=prefix, segments=segments, batch_tokens=25)
        assert torch.allclose(got, expected, atol=1e-12), (prefix, segments)


def test_unsupported_models_fall_back_to_their_own_forward():
    model = tiny_model("gpt2", dtype=torch.float64, normalization_type=None)
    assert not inference.supported(model)
    rows = _rows(2)
    with torch.no_grad():
        expected = model(rows)[:, -1, [1, 2]]
    assert torch.allclose(inference.last_logits(model, rows, torch.tensor([1, 2]), prefix=5), expected, atol=1e-12)
    assert model.cfg.use_split_qkv_input and model.cfg.use_hook_mlp_in


def test_weights_follow_changes_to_the_model():
    model = tiny_model("llama", dtype=torch.float64, seed=4)
    rows = _rows(3)
    before = inference.last_logits(model, rows, torch.tensor([1]))
    with torch.no_grad():
        model.blocks[0].mlp.W_in.mul_(2.0)
        expected = model(rows)[:, -1, [1]]
    after = inference.last_logits(model, rows, torch.tensor([1]))
    assert torch.allclose(after, expected, atol=1e-12) and not torch.allclose(after, before)


def test_probabilities_of_rows_of_many_lengths_and_labels():
    model = tiny_model("llama", dtype=torch.float64, seed=5)
    a, b = _rows(4, n=6, length=9), _rows(5, n=5, length=12)
    requests = {(tuple(r.tolist()), 1, 2) for r in a} | {(tuple(r.tolist()), 4, 3) for r in b}
    requests.add((tuple(a[0].tolist()), 4, 3))  # one row, two label pairs
    got = probabilities(model, requests)
    assert len(got) == len(requests)
    for (row, good, bad), p in got.items():
        with torch.no_grad():
            logits = model(torch.tensor([row]))[0, -1]
        assert p == pytest.approx(float(torch.sigmoid(logits[good] - logits[bad])), abs=1e-12)
    assert no_hooks(model)


def test_measure_all_equals_measure_one_by_one():
    model = tiny_model("gpt2", dtype=torch.float64, seed=6)
    generator = torch.Generator().manual_seed(0)
    examples = [Example(tuple([1] + torch.randint(2, 50, (n,), generator=generator).tolist()), tuple(range(1, n + 1)),
                        good, bad) for n, good, bad in ((7, 3, 4), (9, 5, 6), (7, 8, 9))]
    scores = [{"a": torch.randn(len(e.tokens), generator=generator), "b": torch.randn(len(e.tokens), generator=generator)}
              for e in examples]
    together = measure_all(model, examples, scores, 0)
    for example, by_method, got in zip(examples, scores, together):
        alone = measure(model, example, by_method, 0)
        for method in by_method:
            assert torch.allclose(got[method]["levels"], alone[method]["levels"], atol=1e-12)
            for key in ("p", "log_odds", "comprehensiveness", "sufficiency"):
                assert got[method][key] == pytest.approx(alone[method][key], abs=1e-12)


def no_hooks(model) -> bool:
    return all(not hp.fwd_hooks and not hp._forward_hooks for hp in model.hook_dict.values())


def test_no_hook_point_fires():
    model = tiny_model("llama", seed=7)
    fired = []
    with model.hooks(fwd_hooks=[(lambda name: True, lambda t, hook: fired.append(hook.name))]):
        inference.last_logits(model, _rows(6), torch.tensor([1]))
    assert fired == [] and names.name("embed") in model.hook_dict


@pytest.mark.parametrize("case", [dict(arch="gpt2"), dict(arch="llama", n_heads=4, n_key_value_heads=2)],
                         ids=["gpt2", "llama-gqa"])
def test_edits_from_the_weights_equal_edits_by_hooks(case, monkeypatch):
    """``run`` with an edit at every site (whole and at one position, replacing and adding, from a
    layer, after a clean prefix of keys and values) gives the same residual stream from the weights
    as through TransformerLens' forward with hooks, and a change where an edit changes something."""
    from gradgraph.arch.inference import SITES, Edit
    from gradgraph.arch.spec import ModelSpec

    case = dict(case)
    model = tiny_model(case.pop("arch"), dtype=torch.float64, n_layers=3, seed=7, **case)
    rows = _rows(6, n=4, length=7)
    generator = torch.Generator().manual_seed(0)

    def edits(layer):
        out = []
        for site in SITES:
            width = model.cfg.d_head if site == "z" else model.cfg.d_model
            head = None if site not in inference.HEAD_SITES else (1 if site in ("q_input", "z") else 0)
            value = torch.randn(2, width, generator=generator, dtype=torch.float64)
            out.append(Edit(site, layer, value[:, None], rows=slice(0, 2), head=head))  # every position
            out.append(Edit(site, layer, value, rows=slice(2, 4), position=4, head=head, add=site != "q_input"))
        return out

    trace = {}
    plain, kv = inference.run(model, rows, keep=True, trace=trace)
    for layer, first in ((0, 0), (1, 1), (2, 0)):
        listed = edits(layer)
        resid = None if first == 0 else trace["resid_pre"][first]
        tokens = rows if first == 0 else None
        fast, _ = inference.run(model, tokens, resid=resid, first_layer=first, edits=listed)
        after, _ = inference.run(model, tokens, resid=resid, first_layer=first, edits=listed[1::2],
                                 clean_before=(kv, 4))
        with monkeypatch.context() as hooked:
            hooked.setattr(ModelSpec, "from_weights", property(lambda self: False))
            slow, _ = inference.run(model, tokens, resid=resid, first_layer=first, edits=listed)
            slow_after, _ = inference.run(model, tokens, resid=resid, first_layer=first, edits=listed[1::2],
                                          clean_before=(None, 4))
        assert torch.allclose(fast, slow, atol=1e-10), layer
        assert torch.allclose(after, slow_after, atol=1e-10) and after.shape[1] == 3, layer
        assert (fast - plain).abs().amax((0, 2)).min() > 1e-3  # every position of every row changed
    assert no_hooks_left(model)


def test_bad_edits_are_refused():
    from gradgraph.arch.inference import Edit
    from gradgraph.errors import GradGraphError

    with pytest.raises(GradGraphError, match="site is one of"):
        Edit("hook_z", 0, torch.zeros(4))
    with pytest.raises(GradGraphError, match="needs head"):
        Edit("z", 0, torch.zeros(4))
    with pytest.raises(GradGraphError, match="takes no head"):
        Edit("mlp_out", 0, torch.zeros(4), head=1)
    model = tiny_model("gpt2", dtype=torch.float64, normalization_type=None)
    with pytest.raises(GradGraphError, match="cached keys and values"):
        inference.run(model, _rows(0)[:, 5:], past=inference.run(tiny_model("gpt2"), _rows(0)[:, :5], keep=True)[1])
