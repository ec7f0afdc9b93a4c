# make run   — create the venv, install, start the Pub/Sub emulator, main.py and subscriber.py (Ctrl-C stops all)
# make test  — install the test tools and run the whole suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test bench clean

$(VENV)/.runtime: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

$(VENV)/.dev: requirements-dev.txt $(VENV)/.runtime
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	touch $@

run: $(VENV)/.runtime
	$(PY) -m pubsub_cmdb.launcher

test: $(VENV)/.dev
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(VENV)/.runtime
	$(PY) ../shared/bench/drain.py --n $(or $(N),3000)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
