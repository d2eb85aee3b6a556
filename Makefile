# Two commands do all set-up on a fresh machine:  make demo   and   make test
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo test test-fast test-chaos bench venv clean

venv: $(STAMP)

# torch first, as the CPU build. On Linux PyPI's plain torch==2.13.0 is the multi-GB CUDA build, so the
# pin names the CPU build (2.13.0+cpu), which only PyTorch's CPU index carries (PyPI serves its
# dependencies); where that index is unreachable pip's own sources must carry it (--find-links, a
# mirror), or the install stops: never a silent CUDA download. PyPI's macOS wheels are CPU builds.
# GPU machines: install torch 2.13.0 for your CUDA first, or `make venv TORCH=torch==2.13.0 TORCH_INDEX=`.
TORCH       ?= $(if $(filter Linux,$(shell uname -s)),torch==2.13.0+cpu,torch==2.13.0)
TORCH_INDEX ?= --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if $(PY) -c "import socket; socket.setdefaulttimeout(5); socket.create_connection(('download.pytorch.org', 443)).close()" 2>/dev/null; \
	then $(PY) -m pip install -q '$(TORCH)' $(TORCH_INDEX); \
	else $(PY) -m pip install -q '$(TORCH)'; fi
	# dev: pytest and the test tools; export: transformers (protscale export, its test, the benchmark baseline)
	$(PY) -m pip install -q -e '.[dev,export]'
	# DeepSpeed compiles its CPU communication op at the first engine (~2 min); do it once here.
	$(PY) -c "from deepspeed.accelerator import get_accelerator as a; b = a().create_op_builder('ShareMemCommBuilder'); b and b.load()"
	rm -f $(VENV)/.installed-*; touch $@

## The main job: a real demo sweep (Ray Tune + Ray Train/DeepSpeed, local MLflow store) then the analyzer.
demo: $(STAMP)
	$(VENV)/bin/protscale demo

## The whole test suite (slow end-to-end tests and the chaos suite included), as CI runs it: two
## pytest-xdist workers; the tests that share the session's local Ray run one after another on one of them,
## the tests with a cluster of their own on the other (tests/conftest.py; README, "Tests and benchmarks").
test: $(STAMP)
	$(VENV)/bin/pytest -q -ra --durations=12 -n 2 --dist loadgroup

## The chaos suite alone: faults injected into a sweep on a 4-node Ray cluster, its figures printed.
test-chaos: $(STAMP)
	$(VENV)/bin/pytest -q -ra -s -m chaos -p no:xdist tests/test_chaos.py

## Everything but the slow end-to-end tests.
test-fast: $(STAMP)
	$(VENV)/bin/pytest -q -ra -m "not slow"

clean:
	rm -rf .demo .demo-grid runs mlflow.db
