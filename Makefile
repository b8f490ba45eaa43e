# Two commands do everything on a fresh machine: `make demo` (the main job) and `make test` (all the tests).
# Both install what is missing first (Debian packages, the venv, the package) and are quick when it is all there.
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test docs setup system clean-docs gpu-check

setup: system $(STAMP)

system:
	@bash scripts/system_deps.sh

$(STAMP): setup.py settings.ini
	@test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q -e ".[dev,eval,zoo,cluster,tb]"
	@touch $(STAMP)

demo: setup
	$(BIN)/crossclass reproduce

docs: setup
	$(BIN)/python scripts/build_docs.py

test: setup
	@bash scripts/run_tests.sh

gpu-check: setup
	@bash scripts/gpu_check.sh
