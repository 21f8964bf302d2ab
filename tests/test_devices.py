"""Devices: ``--device`` and ``devices.choose`` refuse what the machine lacks, tensors on another
device than the model are refused, and the semirings' torch path (what runs off the CPU) equals the
numba kernels (what runs on it)."""

import pytest
import torch

from conftest import no_hooks_left
from gradgraph import cli, kernels, tiny_model
from gradgraph.arch import devices
from gradgraph.build import build_graph
from gradgraph.backprop import backprop
from gradgraph.errors import GradGraphError
from gradgraph.interventions import intervene
from gradgraph.metrics import logit_diff
from gradgraph.paths import top_paths
from gradgraph.semirings import Entropy, KMax, Max, SignedMax

CUDA = torch.cuda.is_available()


def test_choose_names_the_devices_this_machine_has():
    assert devices.choose("cpu") == torch.device("cpu")
    assert devices.choose(None) == devices.choose("auto") == torch.device("cuda" if CUDA else "cpu")
    with pytest.raises(GradGraphError, match="unknown device 'gpu'"):
        devices.choose("gpu")
    with pytest.raises(GradGraphError, match="CUDA GPU"):
        devices.choose("cuda:99")
    with pytest.raises(GradGraphError, match="runs on cpu, cuda, mps, not 'meta'"):
        devices.choose("meta")
    if not CUDA:
        with pytest.raises(GradGraphError, match="no CUDA GPU on this machine"):
            devices.choose("cuda")


@pytest.mark.parametrize("command", [["sva"], ["sva-eval"], ["head-types"], ["lrp-eval"], ["attr-eval"],
                                     ["synthetic"], ["explain", "a b", "--good", " a", "--bad", " b"],
                                     ["heads", "--prompts", "p.txt", "--good", " a", "--bad", " b"]])
def test_every_command_refuses_a_device_it_lacks_before_any_work(command, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.txt").write_text("a b\n")
    code = cli.main(command + ["--device", "cuda:99", "--out" if command[0] != "explain" else "--figure",
                               str(tmp_path / "out")])
    assert code == 2 and "cuda:99" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_tokens_on_another_device_than_the_model_are_refused():
    model = tiny_model("llama", dtype=torch.float64, seed=1)
    tokens = torch.tensor([[3, 4, 5, 6]])
    metric = logit_diff(1, 2)
    elsewhere = tokens.to("meta")  # a device of its own, on any machine
    with pytest.raises(GradGraphError, match="tokens are on meta, the model on cpu"):
        build_graph(model, elsewhere, metric)
    with pytest.raises(GradGraphError, match="tokens are on meta, the model on cpu"):
        intervene(model, elsewhere, torch.ones_like(elsewhere), metric, progress=False)
    assert no_hooks_left(model)


@pytest.mark.skipif(not kernels.HAVE_NUMBA, reason="numba is not installed: only the torch path runs")
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_the_torch_path_equals_the_numba_kernels(arch, monkeypatch):
    model = tiny_model(arch, dtype=torch.float64, n_layers=2, seed=3)
    tokens = torch.tensor([[3, 4, 5, 6, 7], [8, 9, 10, 11, 12]])
    graph = build_graph(model, tokens, logit_diff(1, 2))
    assert kernels.available(graph.metric_value)  # what follows first runs the kernels
    semirings = (Max, SignedMax, KMax(3), Entropy)
    compiled = [backprop(graph, sr) for sr in semirings]
    paths = [str(p) for p in top_paths(graph, k=3)]
    monkeypatch.setattr(kernels, "available", lambda *tensors: False)  # as on a GPU
    for sr, expected in zip(semirings, compiled):
        got = backprop(graph, sr)
        for node, value in expected.items():
            assert torch.allclose(got[node], value, rtol=1e-10, atol=1e-300, equal_nan=True), (sr.name, node)
    assert [str(p) for p in top_paths(graph, k=3)] == paths
