# make install: .venv with the package (editable) and its test extra, at the tested versions.
# make test:    lint + format check + the CPU test suite.    make demo: the main job on built-in
# synthetic data.    make lock: refresh constraints.txt.    make format: apply ruff's fixes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: install test lint format demo bench lock clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 is required, found " + sys.version'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

demo: install
	$(PY) -m qaconv_jax.demo

bench: install
	$(PY) bench/bench_matching.py
	$(PY) bench/bench_input.py
	$(PY) bench/bench_eval.py
	$(PY) bench/bench_train.py
	$(PY) bench/bench_accel.py

# The newest releases pyproject.toml allows, installed into a scratch venv and frozen: run it,
# then `make test`, and commit constraints.txt when the suite passes.
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install -q --upgrade pip
	.lock-venv/bin/python -m pip install -q -e '.[test]'
	{ echo "# Tested versions (make lock writes this; make install and CI install with -c constraints.txt)."; \
	  .lock-venv/bin/python -m pip freeze --exclude-editable; } > constraints.txt
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) .lock-venv .cache build *.egg-info
