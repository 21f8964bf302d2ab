"""gradgraph on either TransformerLens: 3.9 (``HookedTransformer``) and 4.x (``TransformerBridge``).

This file runs under both (``make test`` runs it a second time with TransformerLens 4 on the path):
Real equals autograd at every hook point that carries a gradient, the semirings equal the path
dynamic program, the embedded model's graph and SVA accuracy are the same under the other version
(run in a subprocess), and a bridge gradgraph cannot read is refused by name."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gradgraph.arch.models
from gradgraph import GradGraphError, backprop, build_graph, tiny_model
from gradgraph.arch import hooks, lens, names
from gradgraph.metrics import logit_diff
from gradgraph.prompts import single_token_id, to_tokens
from gradgraph.semirings import Real

from conftest import no_hooks_left
from test_families import autograd_reference, family_model, prompts
from test_graph import compare_with_autograd
from test_semiring_reference import SEMIRINGS, assert_matches, case

import version_fingerprint

TL4_PATH = os.environ.get("GRADGRAPH_TL4_PATH")  # a folder holding transformer_lens 4 (make test makes it)
bridge_only = pytest.mark.skipif(lens.MAJOR < 4, reason="a TransformerBridge needs TransformerLens 4")

# Llama's RMSNorm in transformers computes in float32 whatever the model's dtype, and on a bridge the
# Hugging Face modules compute: autograd itself is float32-exact there
TOLERANCE = {("llama", True): 1e-6}


def gradient_reference(model, tokens, mask, metric) -> dict[str, torch.Tensor]:
    """Autograd at every hook point that carries 3.9's gradient on the installed TransformerLens."""
    reference = autograd_reference(model, tokens, mask, metric)
    if lens.is_bridge(model):
        points = lens.gradient_points(model)
        reference = {n: g for n, g in reference.items() if n.split(":")[0] in points}
    return reference


@pytest.mark.parametrize("family", ["gpt2", "llama", "pythia"])
def test_real_equals_autograd_on_the_installed_version(family):
    model = family_model(family, n_layers=3, seed=11)
    tokens, mask, metric = prompts(family)
    graph = build_graph(model, tokens, metric, attention_mask=mask)
    tol = TOLERANCE.get((family, lens.is_bridge(model)), 1e-10)
    reference = gradient_reference(model, tokens, mask, metric)
    compared = compare_with_autograd(graph, backprop(graph, Real), reference, tol)
    # every kind of gradient-carrying hook point, in every layer, was compared
    kinds = {n.split(":")[0] for n in reference}
    expected = [f"blocks.{layer}.{kind}" for layer in range(3) for kind in ("hook_resid_pre", "hook_q_input",
                "hook_k_input", "hook_v_input", "attn.hook_pattern", "hook_attn_out", "mlp.hook_post", "hook_mlp_out")]
    assert set(expected) <= kinds, sorted(set(expected) - kinds)
    assert compared >= 30  # 3 layers × at least 10 gradient-carrying hook points
    assert no_hooks_left(model)


@bridge_only
def test_a_bridge_hook_mlp_in_carries_the_residual_streams_gradient():
    """3.9's hook_mlp_in is a copy that feeds only the MLP; a bridge's is the residual stream itself."""
    model = family_model("gpt2", n_layers=2, seed=3)
    tokens, mask, metric = prompts("gpt2")
    values = backprop(build_graph(model, tokens, metric, attention_mask=mask), Real)
    reference = autograd_reference(model, tokens, mask, metric)
    for layer in range(2):
        resid_mid = values[names.name("resid_mid", layer)][0]
        assert torch.allclose(reference[names.name("mlp_in", layer)], resid_mid, rtol=0, atol=1e-12)
        assert not torch.allclose(values[names.name("mlp_in", layer)][0], resid_mid, atol=1e-6)


@pytest.mark.parametrize("sr_name", list(SEMIRINGS))
@pytest.mark.parametrize("name", ["gpt2-s0", "llama-s1", "gpt2-s2-pad-logprob", "llama-s32-gqa-pad", "pythia-s20-pad"])
def test_semirings_equal_the_path_dp_on_the_installed_version(name, sr_name):
    g, G, stats, _ = case(name)
    assert_matches(g, G, backprop(g, SEMIRINGS[sr_name]), stats, sr_name, "backprop")


@pytest.mark.parametrize("case", [dict(arch="gpt2"), dict(arch="llama", seed=1, n_heads=4, n_key_value_heads=2),
                                  dict(arch="pythia", seed=2)])
def test_graphs_after_a_prefix_equal_the_whole_graphs_on_the_installed_version(case):
    """3.9 starts from the prefix's cached keys and values; a bridge records the whole sequence and
    slices it: the graph is the same either way."""
    from test_prefix import METRIC, P0, _assert_same_after_prefix, _case

    model, prefix, after, mask, whole, whole_mask = _case(**case)
    short = build_graph(model, after, METRIC, attention_mask=mask, prefix=prefix)
    long = build_graph(model, whole, METRIC, attention_mask=whole_mask)
    assert short.prefix == P0 and len(short.cached) == 2 * model.cfg.n_layers
    assert torch.allclose(short.metric_value, long.metric_value, atol=1e-12)
    assert _assert_same_after_prefix(short, long, backprop(short), backprop(long)) > 20
    assert no_hooks_left(model)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_interventions_from_the_weights_equal_the_models_own_runs_on_the_installed_version(family):
    """Mean ablation and patching of every head, q/k/v input and MLP: the runs from the weights
    equal the model's own forward with hooks (forced by ``embed``), which on a bridge starts at a
    layer and reads the final residual on the way to the logits (``hooks.final_residual``)."""
    from gradgraph.interventions import PATHWAYS, activation_means, intervene

    from test_interventions import _clean_and_counterfactual

    model = tiny_model(family, dtype=torch.float64, n_layers=2, seed=6, n_heads=4,
                       **({"n_key_value_heads": 2} if family == "llama" else {}))
    tokens, mask, cf, metric = _clean_and_counterfactual()
    means = activation_means(model, tokens, mask)
    fast = intervene(model, tokens, mask, metric, counterfactual=cf, means=means, progress=False, kinds=PATHWAYS)
    slow = intervene(model, tokens, mask, metric, counterfactual=cf, means=means, progress=False, kinds=PATHWAYS,
                     embed=model.W_E[tokens])
    # a Llama bridge's own forward runs transformers' float32 RMSNorm: float32's resolution of the metric
    atol = 1e-7 if TOLERANCE.get((family, lens.is_bridge(model))) else 1e-10
    for job in ("mean_ablation", "patching"):
        assert set(fast[job]) == set(slow[job]) and len(fast[job]) > 20
        for label, effect in fast[job].items():
            assert torch.allclose(effect, slow[job][label], rtol=0, atol=atol), (job, label)
    last = hooks.final_residual(model, tokens)
    assert last.shape == (*tokens.shape, model.cfg.d_model)
    assert no_hooks_left(model)


@pytest.mark.real
def test_embedded_model_real_equals_autograd(smol_model):
    model = smol_model
    assert isinstance(model, lens.MODEL_TYPES) and lens.is_bridge(model) == (lens.MAJOR >= 4)
    good, bad = single_token_id(model.tokenizer, " are"), single_token_id(model.tokenizer, " is")
    metric = logit_diff(good, bad)
    tokens, mask = to_tokens(model, ["The keys to the cabinet", "The author of the books"])
    graph = build_graph(model, tokens, metric, attention_mask=mask)
    reference = gradient_reference(model, tokens, mask, metric)
    assert compare_with_autograd(graph, backprop(graph, Real), reference, 1e-4) > 30 * 8
    assert no_hooks_left(model)


@pytest.mark.real
@pytest.mark.skipif(not TL4_PATH, reason="GRADGRAPH_TL4_PATH names no TransformerLens 4 folder (make test sets it)")
def test_embedded_graph_and_accuracy_are_the_same_on_both_versions(tmp_path, smol_model):
    """The other version, in a subprocess: same nodes, same edge blocks (Jᵀv to 1e-5 of the largest),
    Real's values to 1e-4, SVA accuracy to 1e-3."""
    env = dict(os.environ)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != Path(TL4_PATH).resolve()]
    if lens.MAJOR < 4:
        paths.insert(0, TL4_PATH)
    env["PYTHONPATH"] = os.pathsep.join(paths)
    out = tmp_path / "other.pt"
    script = Path(__file__).with_name("version_fingerprint.py")
    subprocess.run([sys.executable, str(script), str(out)], env=env, check=True, timeout=600)
    other = torch.load(out, weights_only=False)
    ours = version_fingerprint.fingerprint(smol_model)
    assert {ours["version"][0], other["version"][0]} == {"3", "4"}, (ours["version"], other["version"])
    assert ours["shapes"] == other["shapes"]
    assert list(ours["probes"]) == list(other["probes"])
    for key, probe in ours["probes"].items():
        assert (probe - other["probes"][key]).abs().max() <= 1e-5 * max(1.0, probe.abs().max().item()), key
    for name, value in ours["values"].items():
        assert (value - other["values"][name]).abs().max() <= 1e-4 * max(1.0, value.abs().max().item()), name
    assert abs(ours["accuracy"] - other["accuracy"]) <= 1e-3
    assert (ours["logit_diffs"] - other["logit_diffs"]).abs().max() < 1e-3


@bridge_only
def test_a_bridge_without_compatibility_mode_is_refused():
    hf_model = lens._hf_model(dict(n_layers=1, d_model=8, n_heads=2, d_head=4, d_mlp=8, n_ctx=8, d_vocab=20,
                                   dtype=torch.float32), "GPT2LMHeadModel")
    bridge = lens.word_bridge(hf_model)
    with pytest.raises(GradGraphError, match="without compatibility mode"):
        build_graph(bridge, torch.tensor([[1, 2, 3]]), logit_diff(1, 2))
    assert no_hooks_left(bridge)


@bridge_only
def test_a_bridge_of_an_unknown_architecture_is_refused_by_name():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=16, max_position_embeddings=8)
    config.architectures = ["Qwen2ForCausalLM"]
    bridge = gradgraph.arch.models.set_flags(lens.word_bridge(Qwen2ForCausalLM(config).eval()))
    with pytest.raises(GradGraphError, match="architecture Qwen2ForCausalLM"):
        build_graph(bridge, torch.tensor([[1, 2, 3]]), logit_diff(1, 2))
    assert no_hooks_left(bridge)
    with pytest.raises(GradGraphError, match="GemmaForCausalLM"):  # and no tiny one is made
        tiny_model("gemma")


def test_not_a_transformer_lens_model_is_refused():
    with pytest.raises(GradGraphError, match=f"TransformerLens {lens.VERSION} is installed"):
        build_graph(torch.nn.Linear(2, 2), torch.tensor([[1, 2]]), logit_diff(1, 2))


def test_tiny_models_are_the_installed_versions_kind():
    model = tiny_model("gpt2")
    assert isinstance(model, lens.MODEL_TYPES)
    assert lens.is_bridge(model) == (lens.MAJOR >= 4)


def _tl4_node(label: str, position: int, n_layers: int, reader: bool):
    """TransformerLens 4.3's attribution-patching node for one of gradgraph's edge-graph labels."""
    import re

    from transformer_lens.tools.analysis.attribution_patching import Node

    if label == "embed":
        return Node("embed", position)
    if label == "logits":
        return Node("logits", position, n_layers - 1)
    if label.startswith("MLP"):
        return Node("mlp_in" if reader else "mlp_out", position, int(label[3:]))
    layer, head, kind = re.fullmatch(r"L(\d+)H(\d+)(?:\.([qkv]))?", label).groups()
    return Node(f"{kind}_input" if reader else "attn_head_out", position, int(layer), int(head))


@bridge_only
def test_eap_and_faithfulness_equal_transformer_lens_4s_own_tool():
    """TransformerLens 4.3's ``attribution_patch`` (edge granularity) and ``faithfulness`` on a bridged
    GPT-2: its edges are per position, with the gradient on the corrupt run and the difference clean −
    corrupt, so its score summed over positions is minus gradgraph's EAP with the two runs swapped; its
    recovered fraction is gradgraph's f(C) of the same circuit on every position."""
    from transformer_lens.tools.analysis import attribution_patching as tl

    from gradgraph.circuit_faithfulness import circuit_metric
    from gradgraph.circuits import Circuit, top_edges
    from gradgraph.edge_methods import edge_scores
    from gradgraph.edges import edge_graph

    model = family_model("gpt2", n_layers=2, seed=5)
    generator = torch.Generator().manual_seed(7)
    clean = torch.randint(1, 50, (2, 6), generator=generator)
    corrupt = clean.clone()
    corrupt[:, 1:4] = torch.randint(1, 50, (2, 3), generator=generator)
    good, bad = 7, 9
    metric = logit_diff(good, bad)
    graph = edge_graph(model)
    n_layers = model.cfg.n_layers
    for i in range(2):
        pair = dict(clean=clean[i:i + 1], corrupt=corrupt[i:i + 1],
                    metric_fn=lambda logits: logits[0, -1, good] - logits[0, -1, bad])
        theirs = tl.attribution_patch(model, config=tl.EdgeAttributionConfig(granularity="edge"), **pair)
        ours = edge_scores(model, corrupt[i:i + 1], metric, clean[i:i + 1], method="eap").scores[0]
        assert len(theirs.edge_scores) == len(graph) * clean.shape[1]
        compared = 0
        for u, d in graph.adjacency.nonzero().tolist():
            per_position = [theirs.edge_scores[(_tl4_node(graph.upstream[u], p, n_layers, False),
                                                _tl4_node(graph.downstream[d], p, n_layers, True))]
                            for p in range(clean.shape[1])]
            assert abs(-sum(per_position) - float(ours[u, d])) <= 1e-12
            compared += 1
        assert compared == len(graph)
        scored = edge_scores(model, clean[i:i + 1], metric, corrupt[i:i + 1], method="eap")
        for n in (3, 12, 40):
            circuit = top_edges(scored, n)
            kept = [(_tl4_node(graph.upstream[u], p, n_layers, False), _tl4_node(graph.downstream[d], p, n_layers, True))
                    for u, d in circuit.edges.nonzero().tolist() for p in range(clean.shape[1])]
            recovered = tl.faithfulness(model, circuit=kept, **pair).recovered
            m = lambda c: float(circuit_metric(model, clean[i:i + 1], corrupt[i:i + 1], metric, c)[0])  # noqa: E731
            f = (m(circuit) - m(Circuit.empty(graph))) / (m(Circuit.full(graph)) - m(Circuit.empty(graph)))
            assert abs(f - recovered) < 1e-9, (n, f, recovered)
    assert no_hooks_left(model)
