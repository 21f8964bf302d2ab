"""Every method's component scores in the studies equal what that method's own function computes
(the study adds no arithmetic of its own), on tiny models."""

import pytest
import torch

from gradgraph import GradGraphError, build_graph, tiny_model
from gradgraph.attribution import integrated_flow, lrp
from gradgraph.backprop import backprop, through
from gradgraph.component_methods import METHODS, check_methods, component_labels, score
from gradgraph.interventions import PATHWAYS, attribution_patching, relevance_patching
from gradgraph.metrics import logit_diff
from gradgraph.paths import gradient_flow
from gradgraph.rules import ATTN_LRP, CHEFER2021
from gradgraph.semirings import Max

from conftest import no_hooks_left

GOOD, BAD = torch.tensor([3, 5]), torch.tensor([8, 2])


def _case(arch):
    model = tiny_model(arch, dtype=torch.float64, n_layers=2, seed=3, d_vocab=60,
                       **({"n_heads": 4, "n_key_value_heads": 2} if arch == "llama" else {}))
    tokens = torch.tensor([[5, 9, 13, 4, 7], [21, 6, 11, 30, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    cf = tokens.clone()
    cf[:, 1] = torch.tensor([40, 41])
    head_mask = torch.tensor([[True, False, False, True], [False, True, False, False]])
    return model, tokens, mask, cf, head_mask


def _by_label(attribution, labels) -> torch.Tensor:
    """Σ over positions of ``Attribution.by_component`` rows, per item, in ``labels`` order."""
    totals: dict[tuple[str, int], float] = {}
    for row in attribution.by_component(kinds=PATHWAYS):
        name = row["component"].split("@")[0]
        totals[(name, row["batch"])] = totals.get((name, row["batch"]), 0.0) + row["value"]
    batch = attribution.tokens.shape[0]
    return torch.tensor([[totals.get((label, b), 0.0) for label in labels] for b in range(batch)], dtype=torch.float64)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_each_method_equals_its_own_function(arch):
    model, tokens, mask, cf, head_mask = _case(arch)
    scores = score(model, tokens, mask, GOOD, BAD, counterfactual=cf, head_mask=head_mask, udig_steps=4, baseline=1)
    labels = component_labels(model)
    assert set(scores.components) == set(METHODS) and all(v.shape == (2, len(labels)) for v in scores.components.values())
    metric = logit_diff(GOOD, BAD)
    graph = build_graph(model, tokens, metric, attention_mask=mask)
    # flow: the share of the total |gradient| flow through each component's elements
    flows = gradient_flow(graph)
    total = flows["metric"]
    reg_nodes = {"q": "hook_q_input", "k": "hook_k_input", "v": "hook_v_input"}
    for column, label in enumerate(labels):
        layer = int(label[1:].split("H")[0]) if label.startswith("L") else int(label[3:])
        if label.startswith("MLP"):
            expected = flows[f"blocks.{layer}.hook_mlp_out"].flatten(1).sum(1)
        elif "." in label:
            kind = label.split(".")[1]
            head = int(label.split("H")[1].split("-")[0].split(".")[0])
            head = head // 2 if arch == "llama" and kind in "kv" else head
            expected = flows[f"blocks.{layer}.{reg_nodes[kind]}"][:, :, head].flatten(1).sum(1)
        else:
            head = int(label.split("H")[1])
            expected = flows[f"blocks.{layer}.attn.hook_z"][:, :, head].flatten(1).sum(1)
        assert torch.allclose(scores.components["flow"][:, column], expected / total, atol=1e-12), label
    # best path: the best path through a component's elements (forward ⊗ backward, Max) over the best overall
    best = through(graph, Max, dtype=torch.float64)
    overall = torch.stack([best[s][0].flatten(1).amax(1) for s in graph.sources]).amax(0)
    for column, label in enumerate(labels):
        if "." in label:
            continue
        node = f"blocks.{label[3:]}.hook_mlp_out" if label.startswith("MLP") else f"blocks.{label[1:].split('H')[0]}.attn.hook_z"
        value = best[node][0] if label.startswith("MLP") else best[node][0][:, :, int(label.split("H")[1])]
        assert torch.allclose(scores.components["top_path"][:, column],
                              (value.flatten(1).amax(1) / overall).clamp(max=1.0), atol=1e-12), label
    # patching estimates
    grads = {n: v[0] for n, v in backprop(graph).items()}
    attribution = attribution_patching(model, tokens, cf, grads, kinds=PATHWAYS)
    relp = relevance_patching(model, tokens, mask, cf, metric, kinds=PATHWAYS)["relp"]
    for column, label in enumerate(labels):
        assert torch.allclose(scores.components["attribution"][:, column], attribution[label].double(), atol=1e-12)
        assert torch.allclose(scores.components["relp"][:, column], relp[label].double(), atol=1e-12)
    # relevance and conductance
    attn = lrp(model, tokens, metric, rules=ATTN_LRP, attention_mask=mask, keep="all")
    assert torch.allclose(scores.components["attn_lrp"], _by_label(attn, labels), atol=1e-10)
    assert torch.allclose(scores.tokens["attn_lrp"], attn.scores.double(), atol=1e-12)
    masked = lrp(model, tokens, metric, rules=CHEFER2021, head_mask=head_mask, attention_mask=mask, keep="all")
    assert torch.allclose(scores.components["mask_lrp"], _by_label(masked, labels), atol=1e-10)
    for b in range(2):
        n = int(mask[b].sum())
        one = integrated_flow(model, tokens[b:b + 1, :n], logit_diff(int(GOOD[b]), int(BAD[b])), path="udig", steps=4,
                              baseline=1, progress=False)
        assert torch.allclose(scores.components["udig"][b], _by_label(one, labels)[0], atol=1e-10)
        assert torch.allclose(scores.tokens["udig"][b, :n], one.scores[0].double(), atol=1e-12)
        assert scores.udig_delta[b] == pytest.approx(float(one.delta[0]))
    assert scores.components["attn_lrp"].abs().sum() > 0 and scores.components["udig"].abs().sum() > 0
    for method in METHODS:  # per position: the same values before the sum (max) over positions
        at = scores.positions[method].nan_to_num()
        whole = at.amax(1).clamp(max=1.0) if method == "top_path" else at.sum(1)
        assert torch.allclose(whole, scores.components[method], atol=1e-12), method
    assert no_hooks_left(model)


def test_choosing_methods_and_bad_choices():
    model, tokens, mask, cf, head_mask = _case("gpt2")
    some = score(model, tokens, mask, GOOD, BAD, methods=["attn_lrp", "flow"])
    assert set(some.components) == {"flow", "attn_lrp"} and set(some.branches) == {"flow", "attn_lrp"}
    with pytest.raises(GradGraphError, match="unknown method"):
        check_methods(["flow", "shap"])
    with pytest.raises(GradGraphError, match="counterfactual"):
        score(model, tokens, mask, GOOD, BAD, methods=["relp"])
    with pytest.raises(GradGraphError, match="head mask"):
        score(model, tokens, mask, GOOD, BAD, methods=["mask_lrp"])
