#!/usr/bin/env bash
# The whole test suite, as `make test` and CI run it:
# notebooks and library in sync, every notebook executed, the docs site built, then pytest (whose summary line ends the run).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
export PATH="$PWD/$BIN:$PATH" MPLBACKEND=Agg PYTHONHASHSEED=0

echo "== notebooks clean and library exported?"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
cp -a settings.ini _quarto.yml nbs crossclass_nb "$tmp"/
(cd "$tmp" && nbdev_export >/dev/null && nbdev_clean >/dev/null)
if ! diff -r -q -x __pycache__ -x '*.pyc' nbs "$tmp/nbs" || ! diff -r -q -x __pycache__ -x '*.pyc' crossclass_nb "$tmp/crossclass_nb"; then
  echo "FAILED: run 'nbdev_export && nbdev_clean' and commit the result"; exit 1
fi

echo "== nbdev_test"
nbdev_test --n_workers 2 --timing

echo "== docs site"
python scripts/build_docs.py

echo "== pytest"
python -m pytest tests/ -q -p no:cacheprovider
