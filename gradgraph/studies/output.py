"""Writing a run's results without losing anyone's data.

A run writes every file into a fresh staging folder beside its output folder and publishes them
only when it has finished: a run that fails leaves the previous results as they were. Publishing
replaces only what the previous run of the command wrote, as listed in the output folder's
manifest (``.gradgraph-manifest.json``); a file the command did not write is never touched.

- An output folder that does not exist, or that holds only the previous run's files, is swapped
  whole (rename the old one aside, rename the new one in, delete the old files): readers see the
  previous complete results, then none for an instant, then the new ones — never a mix.
- An output folder that also holds other files gets the new files one by one (each replaced
  atomically), the previous run's files that this run did not write removed, and the manifest
  written last.
- Figures go to a shared folder (the repository's ``figures/``, other commands write there too):
  each is replaced atomically by name and nothing there is deleted.

What a study computed is never lost to a failure in drawing it: the study saves its computed results
first (``Staging.save``, into ``OUT/computed``: ``gradgraph.studies.saved``), then writes each table,
figure and report inside ``Staging.attempt``. A failure there is recorded and the rest go on; the
run then publishes everything that was written, prints the tracebacks, and raises
``OutputIncomplete``, which names what failed, what was saved and the command that draws it again
(``gradgraph <study> --redraw OUT``). An exception before the results were saved publishes nothing.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from gradgraph.errors import GradGraphError, OutputIncomplete
from gradgraph.studies import saved

MANIFEST = ".gradgraph-manifest.json"
T = TypeVar("T")


class Staging:
    """Where a run writes: ``path(name)`` for results, ``figure(name)`` for figures; ``save`` for the
    computed results, ``attempt`` around each thing drawn from them."""

    def __init__(self, root: Path, out: Path, figures: Path, shown: tuple[Path, Path], command: str):
        self.root, self.out, self.figures, self.command = root, out, figures, command
        self._shown = shown  # the folders as the caller named them, for messages and reports
        self.saved = False
        self.failures: list[tuple[str, str, str]] = []  # (what, error, traceback)

    def save(self, value) -> None:
        """Stage the study's computed results (``OUT/computed``), before anything is drawn from them."""
        saved.save(value, self.path(saved.FOLDER), command=self.command)
        self.saved = True

    @contextmanager
    def attempt(self, what: str) -> Iterator[None]:
        """Write one table, figure or report; a failure is recorded (and reported when the run ends)
        instead of stopping the run."""
        try:
            yield
        except Exception as error:  # noqa: BLE001 - any failure in drawing; the computed results are safe
            self.failures.append((what, f"{type(error).__name__}: {error}", traceback.format_exc()))

    def make(self, what: str, make: Callable[[], T]) -> T | None:
        """``make()`` inside ``attempt(what)``: its value, or None when it failed."""
        with self.attempt(what):
            return make()
        return None

    def path(self, name: str) -> Path:
        """A results file (published into ``out``)."""
        path = self.root / "results" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def figure(self, name: str) -> Path:
        """A figure (published into ``figures``; with the results when ``figures`` lies inside ``out``)."""
        if self.figures.is_relative_to(self.out):
            return self.path(str(self.figures.relative_to(self.out) / name))
        path = self.root / "figures" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def final(self, path: Path) -> Path:
        """Where a staged file will be once published (under the folder names the caller gave)."""
        relative = path.relative_to(self.root)
        base = self._shown[0] if relative.parts[0] == "results" else self._shown[1]
        return base.joinpath(*relative.parts[1:])


def check_out(out: str | Path) -> None:
    """Refuse, before any work, an output folder that is a file (or lies under one)."""
    path = Path(out).expanduser().absolute()
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                raise GradGraphError(f"--out {out} must be a folder, but {folder} is a file; choose another --out")
            return


def relative_link(path: Path, base: Path) -> str:
    """``path`` relative to ``base`` where it lies inside it (a report links its figures), else a file URI."""
    path, base = Path(path).absolute(), Path(base).absolute()
    try:
        return str(path.relative_to(base))
    except ValueError:
        return path.as_uri()


def write_csv(path: Path, rows: list[dict], fields: list[str] | None = None) -> None:
    """A table of dicts as CSV (columns: ``fields``, default the first row's keys); nothing when empty."""
    if not rows:
        return
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields or list(rows[0]), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def _manifest(folder: Path) -> set[str]:
    path = folder / MANIFEST
    if not path.is_file():
        return set()
    try:
        return set(json.loads(path.read_text())["files"])
    except (ValueError, KeyError, TypeError):
        return set()


def _remove_listed(folder: Path, names: set[str]) -> None:
    """Delete the listed files (ours) and the sub-folders their removal leaves empty; nothing else."""
    for name in names:
        path = folder / name
        if not path.is_file():
            continue
        path.unlink()
        parent = path.parent
        while parent != folder and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent


def publish_folder(staged: Path, out: Path, command: str) -> None:
    """Make the files in ``staged`` the contents of ``out`` that ``command`` owns (see the module
    docstring); ``staged`` is consumed."""
    new = _files(staged)
    (staged / MANIFEST).write_text(json.dumps(dict(command=command, written=time.strftime("%Y-%m-%dT%H:%M:%S"),
                                                   files=sorted(new)), indent=1))
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, out)
        return
    if not out.is_dir():
        raise GradGraphError(f"{out} exists and is not a folder; choose another output folder")
    previous = _manifest(out)
    foreign = _files(out) - previous - {MANIFEST}
    if not foreign:
        aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.previous-", dir=out.parent))
        os.replace(out, aside / "old")
        os.replace(staged, out)
        _remove_listed(aside / "old", previous | {MANIFEST})
        if not any((aside / "old").iterdir()):  # anything left was not ours: it stays in `aside`
            (aside / "old").rmdir()
            aside.rmdir()
        return
    for name in sorted(new):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged / name, out / name)
    _remove_listed(out, previous - new)
    os.replace(staged / MANIFEST, out / MANIFEST)
    shutil.rmtree(staged)


def publish_files(staged: Path, folder: Path) -> None:
    """Move every file of ``staged`` into the shared ``folder``, each replaced atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in sorted(_files(staged)):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged / name, folder / name)


def _incomplete(staging: Staging, shown_out: Path) -> OutputIncomplete:
    for what, _, trace in staging.failures:
        print(f"\n--- {staging.command}: writing {what} failed:\n{trace}", file=sys.stderr, end="")
    failed = "".join(f"\n  - {what}: {error}" for what, error, _ in staging.failures)
    return OutputIncomplete(
        f"{len(staging.failures)} output(s) of {staging.command} failed and were not written (tracebacks above):"
        f"{failed}\nEverything computed is saved in {shown_out / saved.FOLDER}, and the tables, figures and "
        f"reports that did not fail are in {shown_out}. After a fix, draw them again without recomputing:\n"
        f"  {staging.command} --redraw {shown_out}")


@contextmanager
def staged_run(out: str | Path, figures: str | Path, command: str) -> Iterator[Staging]:
    """Stage a run's files and publish them when the block ends. If the block raises before the
    computed results were saved, nothing is published; after it, everything written is published
    and ``OutputIncomplete`` raised, as when an ``attempt`` failed (the module docstring)."""
    check_out(out)
    check_out(figures)
    shown = (Path(out), Path(figures))
    out, figures = Path(out).expanduser().absolute(), Path(figures).expanduser().absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        staging = Staging(root, out, figures, shown, command)
        try:
            yield staging
        except Exception as error:
            if not staging.saved:
                raise
            staging.failures.append(("the rest of the output", f"{type(error).__name__}: {error}",
                                     traceback.format_exc()))
        results = root / "results"
        results.mkdir(exist_ok=True)
        publish_folder(results, out, command)
        if (root / "figures").exists():
            publish_files(root / "figures", figures)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if staging.failures:
        raise _incomplete(staging, shown[0])
