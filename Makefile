# Every target creates/updates .venv itself, so a fresh clone needs only `make demo` or `make test`.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# CPU build of torch (a file on these machines' disk); GPU images bring their own CUDA torch.
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv demo test test-unit test-cluster test-all bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml scripts/install_env.sh
	PY=$(PY) VENV=$(VENV) TORCH_SPEC="$(TORCH_SPEC)" bash scripts/install_env.sh
	touch $(STAMP)

demo: $(STAMP)
	$(VPY) -m demo

test: $(STAMP)
	$(VPY) -m pytest -q --durations=20

# the per-module unit tests alone (no Ray cluster, no servers): under a minute
test-unit: $(STAMP)
	$(VPY) -m pytest -q tests/unit

# a head and 2 worker hosts in network namespaces, S3 (moto) and MLflow on the bridge: needs root (skips elsewhere)
test-cluster: $(STAMP)
	$(VPY) -m pytest -q -m cluster tests/cluster

test-all: $(STAMP)
	$(VPY) -m pytest -q -m ''

bench: $(STAMP)
	$(VPY) -m bench all --quick

clean:
	rm -rf runs .pytest_cache
