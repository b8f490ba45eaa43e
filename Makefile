# Two commands do everything on a fresh machine: `make demo` (the main job) and `make test` (all the tests).
# Both install what is missing first (Debian packages, the venv, the package) and are quick when it is all there.
# The demo needs only the package and the dataset; the tests need every extra, Chromium and npm too.
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
BASE   := $(VENV)/.installed-base

.PHONY: demo test test-fast docs readme setup system gpu-check

setup: system $(STAMP)

system:
	@bash tools/system_deps.sh

$(BASE): setup.py settings.ini
	@test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q -e .
	@touch $(BASE)

$(STAMP): setup.py settings.ini
	@test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q -e ".[dev,eval,zoo,cluster,tb]"
	@touch $(STAMP) $(BASE)

demo: $(BASE)
	@bash tools/system_deps.sh demo
	$(BIN)/crossclass reproduce

docs: setup
	$(BIN)/python tools/build_docs.py

readme: setup
	$(BIN)/python tools/make_readme.py

test: setup
	@bash tools/run_tests.sh

test-fast: setup
	CROSSCLASS_QUIET=1 $(BIN)/python -m pytest tests/ -q -m "not slow"

gpu-check: $(STAMP)
	@bash bench/gpu_check.sh
