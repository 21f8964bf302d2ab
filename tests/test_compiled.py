"""Compiled ground truth (tracr): the exported programs load as HookedTransformers that reproduce
tracr's own final residual on every input, the distractors change no output, the compiled circuit is
the program's, AUROC counts ties as half, and every method is scored against the circuit, with
AttnLRP's edges and every node method at 1.0 on each program.

The programs are compiled once per session in the tracr environment (``make tracr``: .venv-tracr);
without it these tests are skipped and say so."""

import os
from pathlib import Path

import pytest
import torch

from gradgraph import GradGraphError
from gradgraph.circuit_truth import COMPONENT_METHODS, TOKEN_METHODS, auroc, evaluate
from gradgraph.edge_methods import METHODS as EDGE_METHODS
from gradgraph.studies.compiled import TRACR_PYTHON, compiled_folder
from gradgraph.tracr_models import PROGRAMS, load_compiled

from conftest import no_hooks_left

PYTHON = Path(os.environ.get("GRADGRAPH_TRACR_PYTHON", TRACR_PYTHON))
needs_tracr = pytest.mark.skipif(not PYTHON.is_file(), reason=f"needs the tracr environment ({PYTHON}; make tracr)")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return compiled_folder(str(tmp_path_factory.mktemp("tracr")), PROGRAMS)


def test_auroc_counts_ties_as_half():
    truth = torch.tensor([True, True, False, False, False])
    assert auroc(torch.tensor([3.0, 2.0, 1.0, 0.0, 0.0]), truth) == 1.0
    assert auroc(torch.tensor([0.0, 2.0, 1.0, 0.0, 3.0]), truth) == pytest.approx((0 + 0.5 + 0 + 1 + 1 + 0) / 6)  # pairs (0|1, 0, 3), (2|1, 0, 3)
    assert auroc(torch.zeros(5), truth) == 0.5
    assert torch.isnan(torch.tensor(auroc(torch.ones(3), torch.ones(3, dtype=torch.bool))))


@needs_tracr
@pytest.mark.parametrize("name", PROGRAMS)
def test_the_compiled_model_is_tracrs_and_its_distractors_change_nothing(folder, name):
    compiled = load_compiled(folder, name)
    model, D = compiled.model, compiled.meta["d_model"]
    _, cache = model.run_with_cache(compiled.inputs)
    final = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]
    assert (final[..., :D] - compiled.reference).abs().max() < 1e-6  # tracr computes in float32
    assert final[..., D:].abs().amax() > 0.1  # the distractors write, into dimensions no one reads
    logits = model(compiled.inputs)
    plain = load_compiled(folder, name, distractor_heads=0, distractor_neurons=0, extra_dims=0).model(compiled.inputs)
    assert torch.equal(logits, plain)
    outputs = compiled.meta["outputs"]
    if compiled.meta["numerical"]:
        got = (logits[:, 1:, 0] - logits[:, 1:, 1])
        assert (got - torch.tensor(outputs, dtype=got.dtype)).abs().max() < 1e-6
    else:
        classes = compiled.meta["classes"]
        top = logits[:, 1:].topk(2, dim=-1).values
        clear = top[..., 0] - top[..., 1] > 1e-3  # where no value is defined (no earlier token) both classes tie
        ours = [[classes[c] for c in row] for row in logits[:, 1:].argmax(-1).tolist()]
        assert all(o == t for row_o, row_t, row_c in zip(ours, outputs, clear.tolist())
                   for o, t, c in zip(row_o, row_t, row_c) if c)
        assert clear[:, -1].all()  # the last position, where the metric reads, always has its answer
    assert no_hooks_left(model)


@needs_tracr
def test_the_compiled_circuit_is_the_programs(folder):
    circuits = {name: set(load_compiled(folder, name).circuit.labels) for name in PROGRAMS}
    assert circuits["prev_token"] == {"embed->L0H0.q", "embed->L0H0.k", "embed->L0H0.v", "L0H0->logits"}
    assert {"L0H0->L1H0.v", "L1H0->logits"} <= circuits["two_back"] and "L0H0->logits" not in circuits["two_back"]
    assert {"embed->MLP0", "MLP0->L1H0.v", "L1H0->logits"} <= circuits["frac_prevs"]
    assert {"L0H0->MLP0", "L0H1->MLP0", "MLP0->logits"} <= circuits["prev_pair_equal"]
    assert not any("H2" in e or "H3" in e for c in circuits.values() for e in c)  # no distractor head


@needs_tracr
@pytest.mark.parametrize("name", PROGRAMS)
def test_every_method_against_the_compiled_circuit(folder, name):
    rows = evaluate(load_compiled(folder, name), n=12)
    by = {(r["level"], r["method"]): r["auroc"] for r in rows}
    assert set(by) == ({("edges", m) for m in EDGE_METHODS} | {("nodes", m) for m in EDGE_METHODS}
                       | {("nodes", f"{m} (component)") for m in COMPONENT_METHODS} | {("tokens", m) for m in TOKEN_METHODS})
    assert by[("edges", "attn-lrp")] == 1.0 and by[("nodes", "eap")] == 1.0 and by[("nodes", "flow (component)")] == 1.0
    assert all(0 <= v <= 1 for (level, _), v in by.items() if level != "tokens" or name != "frac_prevs")
    if name == "frac_prevs":  # every position can change the fraction: no position is outside
        assert all(torch.isnan(torch.tensor(v)) for (level, _), v in by.items() if level == "tokens")
    else:
        assert by[("tokens", "ig")] == 1.0


def test_bad_compiled_inputs_are_named(tmp_path):
    with pytest.raises(GradGraphError, match="unknown compiled program"):
        load_compiled(tmp_path, "sort")
    with pytest.raises(GradGraphError, match="no export"):
        load_compiled(tmp_path, "prev_token")


@needs_tracr
def test_real_equals_autograd_on_a_compiled_model(folder):
    from gradgraph import backprop, build_graph
    from gradgraph.metrics import logit_diff
    from gradgraph.semirings import Real

    from test_families import autograd_reference
    from test_graph import compare_with_autograd

    compiled = load_compiled(folder, "two_back")
    tokens, mask = compiled.inputs[:6], torch.ones(6, 6, dtype=torch.long)
    metric = logit_diff(torch.zeros(6, dtype=torch.long), torch.ones(6, dtype=torch.long))
    graph = build_graph(compiled.model, tokens, metric, attention_mask=mask)
    reference = autograd_reference(compiled.model, tokens, mask, metric)
    assert compare_with_autograd(graph, backprop(graph, Real), reference, 1e-10) >= 20
