"""Measure how airy the exported code is: function lengths, `;`-chained lines, long lines, exported-cell sizes.

    python tools/style_report.py            # a table on stdout
    python tools/style_report.py --check    # also exit 1 if a target is missed

Targets: no `;`-chained statement, at most 1 % of code lines over 120 characters, exported cells with a median of at most
12 lines and none over 40.
"""
import argparse
import ast
import io
import json
import statistics
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LONG_LINE, MAX_LONG_SHARE, MAX_CELL_MEDIAN, MAX_CELL = 120, 0.01, 12, 40


def library_files() -> list[Path]:
    return sorted(p for p in (ROOT / "crossclass_nb").glob("*.py") if p.name != "_modidx.py")


def code_lines(source: str) -> list[str]:
    "Lines that hold code (not blank, not only a comment)."
    return [l for l in source.splitlines() if l.strip() and not l.strip().startswith("#")]


def semicolon_lines(source: str) -> set[int]:
    "Line numbers where `;` separates two statements."
    toks = tokenize.generate_tokens(io.StringIO(source).readline)
    return {t.start[0] for t in toks if t.type == tokenize.OP and t.string == ";"}


def function_lengths(source: str) -> list[int]:
    "Lines of every function and method (decorators excluded, docstring included)."
    tree = ast.parse(source)
    return [n.end_lineno - n.lineno + 1 for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def exported_cells(nb_path: Path) -> list[int]:
    "Code-line counts of the notebook's exported cells (directive lines not counted)."
    cells = json.loads(nb_path.read_text())["cells"]
    sizes = []
    for c in cells:
        src = "".join(c["source"])
        if c["cell_type"] != "code" or not any(l.strip() in ("#| export", "#| exporti", "#|export") for l in src.splitlines()):
            continue
        sizes.append(len([l for l in code_lines(src) if not l.startswith("#|")]))
    return sizes


def measure() -> dict:
    lengths, lines, semis, longs = [], 0, 0, 0
    for p in library_files():
        src = p.read_text()
        lengths += function_lengths(src)
        code = [l for l in code_lines(src) if not l.startswith("# %%")]
        lines += len(code)
        semis += len(semicolon_lines(src))
        longs += sum(len(l) > LONG_LINE for l in code)
    cells = {p.stem: exported_cells(p) for p in sorted((ROOT / "nbs").glob("*.ipynb"))}
    lengths.sort()
    return {"functions": len(lengths), "fn_median": statistics.median(lengths),
            "fn_p90": lengths[int(0.9 * (len(lengths) - 1))], "fn_max": lengths[-1], "code_lines": lines,
            "semicolon_lines": semis, "long_lines": longs,
            "cells": {k: (statistics.median(v), max(v), len(v)) for k, v in cells.items() if v}}


def problems(m: dict) -> list[str]:
    out = []
    if m["semicolon_lines"]: out.append(f"{m['semicolon_lines']} lines chain statements with ';'")
    if m["long_lines"] > MAX_LONG_SHARE * m["code_lines"]: out.append(f"{m['long_lines']} lines over {LONG_LINE} characters")
    for nb, (median, biggest, _) in m["cells"].items():
        if median > MAX_CELL_MEDIAN or biggest > MAX_CELL: out.append(f"{nb}: exported cells median {median}, max {biggest}")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    m = measure()
    print(f"functions: {m['functions']}, length median / p90 / max: {m['fn_median']} / {m['fn_p90']} / {m['fn_max']}")
    print(f"code lines: {m['code_lines']}, ';'-chained: {m['semicolon_lines']} ({100 * m['semicolon_lines'] / m['code_lines']:.1f} %), "
          f"over {LONG_LINE} chars: {m['long_lines']} ({100 * m['long_lines'] / m['code_lines']:.1f} %)")
    print("exported cells per notebook (median / max / count):")
    for nb, (median, biggest, count) in m["cells"].items(): print(f"  {nb:28} {median:5g} / {biggest:3d} / {count}")
    bad = problems(m)
    for b in bad: print("MISSED:", b)
    if ap.parse_args().check and bad: sys.exit(1)


if __name__ == "__main__":
    main()
