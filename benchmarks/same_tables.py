"""Whether two runs of a study wrote the same tables: every CSV of the first folder against the
second's, cell by cell (numbers to a relative tolerance, everything else exactly). Run by hand after
a change that should not change any number:

    gradgraph sva --out /tmp/before   # on the old commit
    gradgraph sva --out /tmp/after    # on the new one
    .venv/bin/python benchmarks/same_tables.py /tmp/before /tmp/after [--rtol 1e-6]

Prints each table with its number of cells and the largest relative difference; exits 1 when a
table is missing, has other rows or columns, or differs beyond the tolerance.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def compare(old: Path, new: Path, rtol: float) -> tuple[int, float, list[str]]:
    """(cells, largest relative difference, problems) of one table."""
    with open(old) as a, open(new) as b:
        rows_a, rows_b = list(csv.reader(a)), list(csv.reader(b))
    if len(rows_a) != len(rows_b) or rows_a[:1] != rows_b[:1]:
        return 0, math.inf, [f"{old.name}: {len(rows_a)} vs {len(rows_b)} rows, header {rows_a[:1]} vs {rows_b[:1]}"]
    cells, worst, problems = 0, 0.0, []
    for i, (ra, rb) in enumerate(zip(rows_a[1:], rows_b[1:]), 1):
        if len(ra) != len(rb):
            problems.append(f"{old.name} row {i}: {len(ra)} vs {len(rb)} cells")
            continue
        for column, x, y in zip(rows_a[0], ra, rb):
            cells += 1
            fx, fy = _number(x), _number(y)
            if fx is None or fy is None:
                if x != y:
                    problems.append(f"{old.name} row {i} {column}: {x!r} vs {y!r}")
                continue
            if math.isnan(fx) and math.isnan(fy):
                continue
            difference = abs(fx - fy) / max(abs(fx), abs(fy), 1e-300) if fx != fy else 0.0
            worst = max(worst, difference)
            if difference > rtol:
                problems.append(f"{old.name} row {i} {column}: {x} vs {y} (relative {difference:.2e})")
    return cells, worst, problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--rtol", type=float, default=1e-6)
    args = parser.parse_args()
    tables = sorted(p.relative_to(args.old) for p in args.old.rglob("*.csv"))
    if not tables:
        print(f"no CSV tables in {args.old}")
        return 1
    failed = False
    for table in tables:
        if not (args.new / table).is_file():
            print(f"{table}: missing in {args.new}")
            failed = True
            continue
        cells, worst, problems = compare(args.old / table, args.new / table, args.rtol)
        print(f"{str(table):<28} {cells:>7} cells   largest relative difference {worst:.2e}")
        for problem in problems[:5]:
            print(f"    {problem}")
        failed |= bool(problems)
    print("same tables" if not failed else f"tables differ (rtol {args.rtol:g})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
