# The two set-up commands: `make demo` and `make test`. Each creates .venv, installs wafer and
# fetches the model when it is missing, so both work on a fresh machine.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
WAFER  := $(VENV)/bin/wafer
MODEL  ?= smollm2-135m

.PHONY: demo test gate install model bench protos clean

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

install: $(VENV)/.installed

model: install
	$(WAFER) models pull $(MODEL)

demo: model
	$(PY) -m engine.cli.demo --model $(MODEL)

test: model
	$(PY) -m pytest -q tests

# The perf gate's deterministic part (simulator cycles, weights read per step, seeded tokens,
# scheduler steps, speculation counts) against benches/baseline.json; CI runs it after the tests.
gate: model
	$(PY) -m benches.gate --only deterministic

bench: model
	mkdir -p bench-out
	$(PY) -m pytest benches -s -p no:cacheprovider --benchmark-json bench-out/bench.json

protos: install
	$(PY) -m protos.generate

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks build *.egg-info
	find . -name __pycache__ -prune -exec rm -rf {} +
