# make run   — create the venv, install, start main.py and subscriber.py on the embedded broker (Ctrl-C stops all)
# make run BROKER=emulator — the same on Google's Pub/Sub emulator, started and stopped with them
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
	$(if $(BROKER),BROKER=$(BROKER)) $(PY) -m pubsub_cmdb.launcher

test: $(VENV)/.dev
	$(PY) -m pytest $(PYTEST_ARGS)

# The embedded broker alone, then backlog drain on the emulator beside the seed design and the ceiling.
bench: $(VENV)/.runtime
	$(PY) -m pubsub_cmdb.bench_embedded --n $(or $(N),20000)
	$(PY) ../shared/bench/drain.py --n $(or $(N),3000) --project-dir .

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
