"""Shared fixtures. Tests never touch the network: the embedded model loads from a package."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from gradgraph.allocator import keep_freed_memory  # noqa: E402

keep_freed_memory()  # as the gradgraph command does


@pytest.fixture(scope="session")
def smol_tokenizer():
    from gradgraph.arch.models import load_tokenizer

    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="session")
def smol_model():
    from gradgraph.arch.models import load_model

    return load_model("smollm2-135m")


def no_hooks_left(model) -> bool:
    """True when no forward or backward hook is attached to any hook point of ``model``."""
    return all(
        not hp.fwd_hooks and not hp.bwd_hooks and not hp._forward_hooks and not hp._backward_hooks
        for hp in model.hook_dict.values()
    )


@pytest.fixture(scope="session")
def sva_run(tmp_path_factory, smol_model):
    """One small run of the SVA study (the main job) for the tests that read its output: its
    folder, with a file of the user's that was there before."""
    from gradgraph.cli import main

    out = tmp_path_factory.mktemp("sva-run") / "sva"
    out.mkdir()
    (out / "my_notes.txt").write_text("mine")
    assert main(["sva", "--limit", "6", "--intervention-items", "2", "--methods",
                 "flow,top_path,attribution,attn_lrp,udig", "--udig-steps", "4", "--resamples", "50",
                 "--out", str(out)]) == 0
    return out
