#!/usr/bin/env bash
# The whole test suite, as `make test` and CI run it, each check once:
#   1. notebooks and library in sync (nbdev_export and nbdev_clean change nothing);
#   2. the docs site: every notebook executed once, as nbdev_test would run it (same skipped cells, the build fails
#      on the first error with the notebook and the cell), its timings listed, the pages rendered into _docs/;
#   3. pytest in two processes (pytest-xdist, a test file to a process), whose tests reuse that site, one wheel and
#      one `crossclass reproduce --quick` (fixtures of tests/conftest.py); its summary line ends the run.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
export PATH="$PWD/$BIN:$PATH" MPLBACKEND=Agg PYTHONHASHSEED=0
step() { echo "== $1 (after $SECONDS s)"; }

step "notebooks clean and library exported?"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
cp -a settings.ini _quarto.yml nbs crossclass_nb "$tmp"/
(cd "$tmp" && nbdev_export >/dev/null && nbdev_clean >/dev/null)
if ! diff -r -q -x __pycache__ -x '*.pyc' nbs "$tmp/nbs" || ! diff -r -q -x __pycache__ -x '*.pyc' crossclass_nb "$tmp/crossclass_nb"; then
  echo "FAILED: run 'nbdev_export && nbdev_clean' and commit the result"; exit 1
fi

step "notebooks executed and the docs site built"
python tools/build_docs.py

step "pytest"
python -m pytest tests/ -q -p no:cacheprovider --durations=15 -n 2 --dist loadfile   # two processes, a test file each
