# Two commands do everything on a fresh machine: `make demo` (the main job) and `make test` (all the tests).
# Both install what is missing first (Debian packages, the venv, the package) and are quick when it is all there.
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast docs readme setup system gpu-check

setup: system $(STAMP)

system:
	@bash tools/system_deps.sh

$(STAMP): setup.py settings.ini
	@test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q -e ".[dev,eval,zoo,cluster,tb]"
	@touch $(STAMP)

demo: setup
	$(BIN)/crossclass reproduce

docs: setup
	$(BIN)/python tools/build_docs.py

readme: setup
	$(BIN)/python tools/make_readme.py

test: setup
	@bash tools/run_tests.sh

test-fast: setup
	CROSSCLASS_QUIET=1 $(BIN)/python -m pytest tests/ -q -m "not slow"

gpu-check: setup
	@bash bench/gpu_check.sh
