"""AttnLRP by the published reference implementation (PyPI ``lxt`` 2.1, ``lxt.efficient``) on the
Hugging Face version of the embedded model, loaded offline from the same GGUF file. Run as a
script in its own process (lxt patches transformers' Llama classes for the whole process):

    python tests/lxt_reference.py attn-lrp " are" " is" "The keys to the cabinet" ...

prints a JSON list, per text: token ids (no BOS), the logit difference at the last position and
the relevance per token (input × modified gradient at the embeddings, summed over d_model);
``cp-lrp`` in place of ``attn-lrp`` applies lxt's CP-LRP patches."""

import json
import sys
import types
import warnings

import torch

# lxt.efficient.models' __init__ imports patches for BERT, GPT-2 and ViT that need older
# transformers and torchvision; the Llama patch needs none of them: load the package without it.
import importlib.util  # noqa: E402

_spec = importlib.util.find_spec("lxt")
_models = types.ModuleType("lxt.efficient.models")
_models.__path__ = [_spec.submodule_search_locations[0] + "/efficient/models"]
_models.get_default_map = None  # lxt.efficient.core imports it; the patch map is passed explicitly
sys.modules["lxt.efficient.models"] = _models

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from transformers.models.llama import modeling_llama  # noqa: E402

import lxt.efficient.models.llama as lxt_llama  # noqa: E402
from lxt.efficient import monkey_patch  # noqa: E402

from gradgraph.arch.models import EMBEDDED, _gguf_folder  # noqa: E402


def load(rules: str | None = None, attention: str = "eager"):
    """``(model, tokenizer)``: the embedded model in Hugging Face's Llama classes, float32, frozen;
    with lxt's ``rules`` (``attn-lrp`` / ``cp-lrp``) patched in, or plain (``None``)."""
    entry = EMBEDDED["smollm2-135m"]
    folder = str(_gguf_folder(entry))
    if rules is not None:
        original = modeling_llama.ALL_ATTENTION_FUNCTIONS
        monkey_patch(modeling_llama, {"attn-lrp": lxt_llama.attnLRP, "cp-lrp": lxt_llama.cp_LRP}[rules])
        modeling_llama.ALL_ATTENTION_FUNCTIONS = original
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=entry.gguf_file)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=entry.gguf_file, dtype=torch.float32,
                                                     attn_implementation=attention)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer


def main(rules: str, good: str, bad: str, *texts: str) -> list[dict]:
    model, tokenizer = load(rules)
    good_id, bad_id = (tokenizer.encode(w, add_special_tokens=False)[0] for w in (good, bad))
    out = []
    for text in texts:
        ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
        embeds = model.get_input_embeddings()(ids).requires_grad_(True)
        logits = model(inputs_embeds=embeds).logits
        diff = logits[0, -1, good_id] - logits[0, -1, bad_id]
        diff.backward()
        relevance = (embeds * embeds.grad)[0].sum(-1)
        out.append(dict(tokens=ids[0].tolist(), metric=diff.item(), relevance=relevance.tolist()))
    return out


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:])))
