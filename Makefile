# Two commands do all set-up on a fresh machine:  make demo   and   make test
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo test test-fast bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU build of torch first: on PyPI a plain `torch==2.13.0` is the multi-GB CUDA build, so take
	# PyTorch's CPU index when it is reachable (machines without it carry the CPU wheel locally).
	if $(PY) -c "import socket; socket.setdefaulttimeout(5); socket.create_connection(('download.pytorch.org', 443)).close()" 2>/dev/null; \
	then $(PY) -m pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu; \
	else $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e '.[dev]'
	# DeepSpeed compiles its CPU communication op at the first engine (~2 min); do it once here.
	$(PY) -c "from deepspeed.accelerator import get_accelerator as a; b = a().create_op_builder('ShareMemCommBuilder'); b and b.load()"
	rm -f $(VENV)/.installed-*; touch $@

## The main job: a real demo sweep (Ray Tune + Ray Train/DeepSpeed, local MLflow store) then the analyzer.
demo: $(STAMP)
	$(VENV)/bin/protscale demo

## The whole test suite (slow end-to-end tests included), as CI runs it.
test: $(STAMP)
	$(VENV)/bin/pytest -q -ra --durations=12

## Everything but the slow end-to-end tests.
test-fast: $(STAMP)
	$(VENV)/bin/pytest -q -ra -m "not slow"

clean:
	rm -rf .demo runs mlflow.db
