"""Every method against compiled ground truth (``gradgraph compiled``): tracr programs compiled to
transformers, loaded widened with distractors (``gradgraph.tracr_models``), and each method's node-,
edge- and token-level AUROC against the compiled circuit (``gradgraph.circuit_truth``).

The compiled weights come from ``--tracr`` (a folder of ``tracr_export.py``'s output; default
``$XDG_CACHE_HOME/gradgraph/tracr``). Where it holds no export and the tracr environment exists
(``make tracr``: ``.venv-tracr``, or ``$GRADGRAPH_TRACR_PYTHON``), the programs are compiled into it
first (local, ~10 s; tracr stays out of the main environment).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from gradgraph import plot
from gradgraph.arch.models import cache_dir
from gradgraph.circuit_truth import evaluate
from gradgraph.errors import GradGraphError
from gradgraph.studies.output import staged_run, write_csv
from gradgraph.tracr_models import PROGRAMS, load_compiled

COMMAND = "gradgraph compiled"
EXPORTER = Path(__file__).resolve().parents[1] / "tracr_export.py"
TRACR_PYTHON = Path(__file__).resolve().parents[2] / ".venv-tracr" / "bin" / "python"


@dataclass
class Config:
    tracr: str | None = None  # folder of the compiled programs (default: the cache's)
    programs: tuple[str, ...] = PROGRAMS
    items: int = 32
    steps: int = 5  # EAP-IG's points
    distractor_heads: int = 2
    distractor_neurons: int = 8
    seed: int = 0
    out: str = "results/compiled"


def compiled_folder(folder: str | None, programs) -> Path:
    """The folder holding every program's export, compiling them there with tracr when it holds none."""
    path = Path(folder) if folder else cache_dir() / "tracr"
    if all((path / f"{p}.npz").is_file() for p in programs):
        return path
    python = Path(os.environ.get("GRADGRAPH_TRACR_PYTHON", TRACR_PYTHON))
    if not python.is_file():
        raise GradGraphError(f"{path} holds no compiled programs and the tracr environment is missing ({python}): "
                             "run `make tracr`, or compile elsewhere with gradgraph/tracr_export.py and pass --tracr")
    done = subprocess.run([str(python), str(EXPORTER), str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        raise GradGraphError(f"compiling the tracr programs failed:\n{done.stderr[-2000:]}")
    return path


def run(config: Config) -> list[dict]:
    unknown = [p for p in config.programs if p not in PROGRAMS]
    if unknown:
        raise GradGraphError(f"unknown programs {unknown}; choose from {list(PROGRAMS)}")
    folder = compiled_folder(config.tracr, config.programs)
    rows = []
    for name in tqdm(config.programs, desc="compiled", unit="program"):
        compiled = load_compiled(folder, name, distractor_heads=config.distractor_heads,
                                 distractor_neurons=config.distractor_neurons, seed=config.seed)
        rows += evaluate(compiled, n=config.items, steps=config.steps, seed=config.seed)
    return rows


def write(config: Config, rows: list[dict]) -> None:
    programs = list(dict.fromkeys(r["program"] for r in rows))
    for level in ("edges", "nodes", "tokens"):
        print(f"AUROC against the compiled circuit, {level} (members / non-members per program):")
        methods = list(dict.fromkeys(r["method"] for r in rows if r["level"] == level))
        counts = {r["program"]: f"{r['members']}/{r['non_members']}" for r in rows if r["level"] == level}
        print(f"  {'method':<24}" + "".join(f"{p + ' ' + counts.get(p, ''):>24}" for p in programs))
        for m in methods:
            values = {r["program"]: r["auroc"] for r in rows if r["level"] == level and r["method"] == m}
            print(f"  {m:<24}" + "".join(f"{values.get(p, float('nan')):>24.3f}" for p in programs))
    with staged_run(config.out, str(Path(config.out) / "figures"), COMMAND) as out:
        out.make("auroc.csv", lambda: write_csv(out.path("auroc.csv"), rows))
        out.make("compiled_auroc.png", lambda: plot.auroc_table(rows, out.figure("compiled_auroc.png"),
                                                                title="AUROC against compiled circuits (tracr)"))
    print(f"wrote {config.out}/auroc.csv, {config.out}/figures/compiled_auroc.png")


def main(config: Config) -> list[dict]:
    rows = run(config)
    write(config, rows)
    return rows


__all__ = ["Config", "compiled_folder", "main", "run"]
