# Newcomer entry points: `make demo` (the main job end to end) and `make test`.
# Both create the virtual environment on first use; nothing needs installing by hand.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEMO_OUT ?= demo_out

.PHONY: setup setup-reference setup-tpu setup-beam demo test test-slow bench clean

setup: $(VENV)/.setup-done

$(VENV)/.setup-done: requirements.txt requirements-test.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements.txt -r requirements-test.txt
	$(PIP) install -q --no-deps -e .
	touch $@

# PyTorch references for the parity tests (torch/torchvision from the local wheel cache).
setup-reference: $(VENV)/.reference-done

$(VENV)/.reference-done: $(VENV)/.setup-done
	$(PIP) install -q -e '.[reference]'
	touch $@

# libtpu for ahead-of-time compilation against TPU topologies (CPU-only machines can compile).
setup-tpu: $(VENV)/.tpu-done

$(VENV)/.tpu-done: $(VENV)/.setup-done
	$(PIP) install -q -e '.[tpu-aot]' || echo "libtpu unavailable: TPU AOT tests will skip"
	touch $@

# Apache Beam for `pathjax tile --runner beam` and its tests (tests/test_tile_beam.py).
setup-beam: $(VENV)/.beam-done

$(VENV)/.beam-done: $(VENV)/.setup-done
	$(PIP) install -q -e '.[beam]'
	touch $@

demo: setup
	$(PY) -m pathjax.demo --out $(DEMO_OUT)

# The default test run: unit, parity (PyTorch references) and AOT tests; about 20 minutes
# on 2 cores. Tests marked slow (multi-process, kill -9 resume, 8-device equivalence,
# end-to-end training, the demo) run with `make test-slow`; CI (.ci/run) runs both.
test: setup setup-reference setup-tpu setup-beam
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow" tests

test-slow: setup setup-reference setup-tpu setup-beam
	$(PY) -m pytest -q -n 2 --dist loadfile -m slow tests

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
