# Two commands do everything on a fresh machine:
#   make demo   installs what it needs and runs the main job on the embedded default
#   (make ablations: every paper ablation at demo scale, after the demo)
#   make test   installs and runs the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: test test-fast demo ablations install clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# The CPU build of torch must be installed first so nothing pulls a CUDA build.
# open-flamingo is installed without its dependencies (open_clip -> torchvision
# -> CUDA torch); the tests load its module file open_flamingo/src/helpers.py by path.
$(STAMP): setup.py | $(PY)
	$(PIP) install --quiet "torch==2.13.0"
	$(PIP) install --quiet -e ".[test]"
	$(PIP) install --quiet --no-deps "open-flamingo==2.0.1"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	XLA_FLAGS="--xla_force_host_platform_device_count=8" $(PY) -m pytest -q -n 2 --dist loadscope --durations=15 tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

demo: $(STAMP)
	$(PY) -m flamingo_jax.demo --workdir demo_workdir

# Every paper ablation (configs/ablations/) at demo scale; reuses demo_workdir's
# data, LM and vision tower (running the demo first when they are missing).
ablations: $(STAMP)
	$(PY) -m flamingo_jax.ablations --workdir demo_workdir

clean:
	rm -rf $(VENV) demo_workdir
