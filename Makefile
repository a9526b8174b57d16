# make install: .venv with the package (editable) and its test extra.
# make test:    the CPU test suite.    make demo: the main job on built-in synthetic data.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: install test demo bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 is required, found " + sys.version'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

test: install
	$(PY) -m pytest -q

demo: install
	$(PY) -m qaconv_jax.demo

bench: install
	$(PY) bench/bench_matching.py
	$(PY) bench/bench_input.py
	$(PY) bench/bench_eval.py
	$(PY) bench/bench_train.py

clean:
	rm -rf $(VENV) .cache build *.egg-info
