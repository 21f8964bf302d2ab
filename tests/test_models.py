"""Model loading: the embedded model against Hugging Face, tiny models, the cache, bad names."""

import pytest
import torch

from gradgraph import GradGraphError, load_model, tiny_model
from gradgraph.arch import models as models_module


def _check_flags(model):
    assert model.cfg.use_split_qkv_input
    assert model.cfg.use_hook_mlp_in
    assert not model.cfg.use_attn_result


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_tiny_model_architecture_and_flags(arch):
    d_head = 3 if arch == "gpt2" else 2
    model = tiny_model(arch, seed=1, n_layers=3, d_model=12, n_heads=4, d_head=d_head)
    _check_flags(model)
    assert model.cfg.n_layers == 3 and model.cfg.d_model == 12 and model.cfg.d_head == d_head
    if arch == "gpt2":
        assert model.cfg.normalization_type == "LN"
        assert model.cfg.positional_embedding_type == "standard"
        assert model.cfg.act_fn.startswith("gelu") and not model.cfg.gated_mlp
        assert model.cfg.n_key_value_heads is None
        # biases exist and are non-zero
        for bias in (model.blocks[0].attn.b_Q, model.blocks[0].attn.b_O, model.blocks[0].mlp.b_in):
            assert bias.abs().min() > 0
    else:
        assert model.cfg.normalization_type == "RMS"
        assert model.cfg.positional_embedding_type == "rotary"
        assert model.cfg.act_fn == "silu" and model.cfg.gated_mlp
        assert model.cfg.n_key_value_heads == 2
        assert model.blocks[0].attn._W_K.shape[0] == 2  # grouped-query: 2 key/value heads
    logits = model(torch.randint(0, 50, (2, 7)))
    assert logits.shape == (2, 7, 50) and torch.isfinite(logits).all()


def test_tiny_model_seeds_and_dtype():
    a, b = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    assert not torch.equal(a.blocks[0].attn.W_Q, b.blocks[0].attn.W_Q)
    assert torch.equal(a.blocks[0].attn.W_Q, tiny_model("llama", seed=0).blocks[0].attn.W_Q)
    assert tiny_model("gpt2", dtype=torch.float64).W_E.dtype == torch.float64


def test_tiny_model_gqa_two_queries_per_kv_head():
    model = tiny_model("llama", n_heads=4, n_key_value_heads=2)
    assert model.cfg.n_heads // model.cfg.n_key_value_heads == 2


def test_tiny_model_bad_arch():
    with pytest.raises(GradGraphError, match="arch must be one of .*'bert'.*'gpt2'"):
        tiny_model("t5")
    with pytest.raises(GradGraphError, match="d_head must be even"):
        tiny_model("llama", d_head=3)


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(GradGraphError, match="unknown model 'no-such-model'.*smollm2-135m"):
        load_model("no-such-model")


def test_official_name_offline_says_so(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(GradGraphError, match="HF_HUB_OFFLINE.*smollm2-135m"):
        load_model("gpt2")


def test_official_bert_names_load_as_encoders():
    from gradgraph.arch.lens import HookedEncoder, HookedTransformer, official_class, official_name

    assert official_class(official_name("bert-base-cased")) is HookedEncoder
    assert official_class(official_name("pythia-70m")) is HookedTransformer
    assert official_class(official_name("gemma-2-2b")) is HookedTransformer


def test_folder_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(GradGraphError, match="no config.json"):
        load_model(str(tmp_path))


def test_embedded_list():
    assert "smollm2-135m" in models_module.EMBEDDED
    assert models_module.EMBEDDED_NAMES == list(models_module.EMBEDDED)


def test_cache_detects_corruption_and_partial_writes(tmp_path):
    state = {"w": torch.arange(1000, dtype=torch.float32)}
    models_module._write_cache(tmp_path, {"d_model": 4}, state)
    config, loaded = models_module._read_cache(tmp_path)
    assert config == {"d_model": 4} and torch.equal(loaded["w"], state["w"])
    weights = tmp_path / "weights.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    weights.write_bytes(bytes(data))
    assert models_module._read_cache(tmp_path) is None
    weights.write_bytes(bytes(data[: len(data) // 3]))  # a truncated file
    assert models_module._read_cache(tmp_path) is None
    models_module._write_cache(tmp_path, {"d_model": 4}, state)
    (tmp_path / "manifest.json").unlink()  # interrupted before the manifest
    assert models_module._read_cache(tmp_path) is None


@pytest.mark.real
def test_embedded_model_flags_and_shape(smol_model):
    _check_flags(smol_model)
    cfg = smol_model.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_key_value_heads) == (30, 576, 9, 3)
    assert cfg.normalization_type == "RMSPre" and cfg.gated_mlp and cfg.positional_embedding_type == "rotary"


@pytest.mark.real
def test_embedded_model_matches_hugging_face(smol_model):
    """Log-probs of the converted TransformerLens model equal the HF model's to 1e-3."""
    from transformers import AutoModelForCausalLM

    entry = models_module.EMBEDDED["smollm2-135m"]
    hf = AutoModelForCausalLM.from_pretrained(
        str(models_module._gguf_folder(entry)), gguf_file=entry.gguf_file, dtype=torch.float32
    ).eval()
    prompts = ["The keys to the cabinet", "The author that the guards like", "Paris is the capital of"]
    tokenizer = smol_model.tokenizer
    for prompt in prompts:
        ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer.encode(prompt, add_special_tokens=False)])
        with torch.no_grad():
            ours = smol_model(ids).log_softmax(-1)
            theirs = hf(ids).logits.log_softmax(-1)
        assert (ours - theirs).abs().max().item() < 1e-3, prompt


@pytest.mark.real
def test_embedded_model_prefers_agreeing_verb(smol_model):
    tok = smol_model.tokenizer
    are, is_ = (tok.encode(w, add_special_tokens=False)[0] for w in (" are", " is"))
    ids = smol_model.to_tokens(["The keys to the cabinet", "The key to the cabinets"])
    last = smol_model(ids)[:, -1]
    assert last[0, are] > last[0, is_]
    assert last[1, is_] > last[1, are]
