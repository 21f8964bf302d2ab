"""A study's computed results on disk, so that its tables, figures and reports can be drawn again
without recomputing (``gradgraph <study> --redraw OUT``).

Two files in ``OUT/computed/``: ``result.json`` (the structure: dicts, lists, numbers, strings, and
the study's dataclasses by name) and ``tensors.safetensors`` (every tensor and array it refers to).
No pickle: loading builds only ``gradgraph`` dataclasses, from their fields.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from gradgraph.errors import GradGraphError

FOLDER = "computed"
FORMAT = 1


def _encode(value, tensors: dict[str, torch.Tensor]):
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (torch.Tensor, np.ndarray)):
        key = f"t{len(tensors)}"
        kind = "tensor" if isinstance(value, torch.Tensor) else "numpy"
        tensor = value.detach().cpu() if kind == "tensor" else torch.from_numpy(np.ascontiguousarray(value))
        tensors[key] = tensor.contiguous().clone()
        return {"__" + kind + "__": key}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode(v, tensors) for k, v in value.items()}
        return {"__dict__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in value.items()]}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        cls = type(value)
        if not cls.__module__.startswith("gradgraph."):
            raise GradGraphError(f"cannot save a {cls.__module__}.{cls.__name__}: only gradgraph's dataclasses")
        fields = {f.name: _encode(getattr(value, f.name), tensors) for f in dataclasses.fields(value) if f.init}
        return {"__dataclass__": f"{cls.__module__}:{cls.__qualname__}", "fields": fields}
    raise GradGraphError(f"cannot save a value of type {type(value).__name__} among a study's results")


def _decode(value, tensors: dict[str, torch.Tensor]):
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if "__numpy__" in value:
        return tensors[value["__numpy__"]].numpy()
    if "__tuple__" in value:
        return tuple(_decode(v, tensors) for v in value["__tuple__"])
    if "__dict__" in value:
        return {_hashable(_decode(k, tensors)): _decode(v, tensors) for k, v in value["__dict__"]}
    if "__dataclass__" in value:
        module, name = value["__dataclass__"].split(":")
        if not module.startswith("gradgraph."):
            raise GradGraphError(f"saved results name a class outside gradgraph ({value['__dataclass__']}); not loaded")
        cls = getattr(importlib.import_module(module), name, None)
        if cls is None or not dataclasses.is_dataclass(cls):
            raise GradGraphError(f"saved results name {value['__dataclass__']}, which this gradgraph does not have; "
                                 f"run the study again")
        return cls(**{k: _decode(v, tensors) for k, v in value["fields"].items()})
    return {k: _decode(v, tensors) for k, v in value.items()}


def _hashable(key):
    return tuple(_hashable(k) for k in key) if isinstance(key, list) else key


def save(value, folder: Path, *, command: str) -> Path:
    """Write ``value`` (a study's computed results) into ``folder``; returns it."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(value, tensors)
    save_file(tensors, str(folder / "tensors.safetensors"))
    header = dict(format=FORMAT, command=command, written=time.strftime("%Y-%m-%dT%H:%M:%S"))
    text = json.dumps(dict(header, result=tree), indent=None, allow_nan=True)
    (folder / "result.json").write_text(text)
    return folder


def load(out: str | Path, *, command: str):
    """The computed results a run of ``command`` saved under ``out`` (``out/computed``)."""
    folder = Path(out) / FOLDER
    if not (folder / "result.json").is_file():
        raise GradGraphError(f"{out} holds no saved results ({folder / 'result.json'} is missing); --redraw reads "
                             f"the output folder of an earlier run (gradgraph writes them since this version)")
    try:
        saved = json.loads((folder / "result.json").read_text())
        tensors = load_file(str(folder / "tensors.safetensors"))
    except (OSError, ValueError) as error:
        raise GradGraphError(f"the saved results in {folder} cannot be read ({error}); run the study again") from None
    if saved.get("format") != FORMAT:
        raise GradGraphError(f"{folder} holds results in format {saved.get('format')}, this gradgraph reads {FORMAT}; "
                             f"run the study again")
    if saved.get("command") != command:
        raise GradGraphError(f"{out} holds the results of `{saved.get('command')}`, not `{command}`; "
                             f"redraw them with `{saved.get('command')} --redraw {out}`")
    return _decode(saved["result"], tensors)


__all__ = ["FOLDER", "load", "save"]
