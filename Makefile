# churnsignal: `make demo` runs everything embedded; `make test` runs every test against the
# embedded Tansu broker and then against a real Apache Kafka (KRaft) fetched with Maven.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
KAFKA_DIR ?= .cache/kafka-test

.PHONY: demo test test-unit test-tansu test-kafka test-compiled lint typecheck compose-check bench bench-gateway venv clean

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[embedded,dev,backtest,stripe]'
	touch $(STAMP)

venv: $(STAMP)

# The compiled build (setup.py: the per-event core through mypyc), installed, not editable,
# in its own environment: what `make bench` measures and the Dockerfile ships.
CVENV ?= .venv-compiled
CPY := $(CVENV)/bin/python
CDEPS := $(CVENV)/.deps
CSTAMP := $(CVENV)/.installed
SOURCES := $(shell find churnsignal stream schemas sinks -name '*.py' -o -name '*.yaml')

$(CDEPS): pyproject.toml constraints.txt
	python3 -m venv $(CVENV)
	$(CPY) -m pip install -q --upgrade pip
	$(CPY) -m pip install -q -c constraints.txt '.[embedded,dev,backtest,stripe,bench]' 'setuptools>=77' wheel
	touch $(CDEPS)

$(CSTAMP): $(CDEPS) setup.py $(SOURCES)
	rm -rf build  # setuptools would package what an earlier build left there
	CHURNSIGNAL_COMPILE=1 $(CPY) -m pip install -q --no-build-isolation --no-deps --force-reinstall .
	touch $(CSTAMP)

demo: $(STAMP)
	$(VENV)/bin/churnsignal demo

# PYTHONSAFEPATH: the workers it starts (python -m churnsignal) import the installed build,
# not the source tree in the working directory.
bench: $(CSTAMP)
	PYTHONSAFEPATH=1 $(CVENV)/bin/churnsignal bench

bench-gateway: $(CSTAMP)
	PYTHONSAFEPATH=1 $(CVENV)/bin/churnsignal bench --gateway

lint: $(STAMP) typecheck
	$(VENV)/bin/ruff check .

# mypy over a tree of links shaped like the installed package (churnsignal.stream is stream/).
typecheck: $(STAMP)
	rm -rf .cache/mypy-tree && mkdir -p .cache/mypy-tree
	cp -rs $(abspath churnsignal) .cache/mypy-tree/churnsignal
	for d in stream schemas sinks; do ln -s $(abspath $$d) .cache/mypy-tree/churnsignal/$$d; done
	cd .cache/mypy-tree && $(abspath $(VENV))/bin/mypy -p churnsignal --config-file $(abspath pyproject.toml) \
	  --cache-dir $(abspath .cache/mypy)

test-unit: $(STAMP)
	$(PY) -m pytest tests/unit -q

# Integration tests mostly wait on brokers and worker processes: they run in TEST_JOBS
# pytest-xdist processes, each with its own embedded broker. A file runs whole and in order
# in one process (loadfile): its module fixtures start once, and some tests read what an
# earlier one of their file left. Then, in one process, the tests marked serial (xdist
# cannot schedule them) and those that stop the shared Apache Kafka.
TEST_JOBS ?= 2
XDIST = -n $(TEST_JOBS) --dist loadfile

test-tansu: $(STAMP)
	env -u KAFKA_BOOTSTRAP_SERVERS $(PY) -m pytest tests -q $(XDIST) -m 'not serial'
	env -u KAFKA_BOOTSTRAP_SERVERS $(PY) -m pytest tests -q -m serial

test-kafka: $(STAMP)
	deploy/kafka/kafka.sh fetch
	bootstrap=$$(deploy/kafka/kafka.sh start $(abspath $(KAFKA_DIR))) && \
	  trap 'deploy/kafka/kafka.sh stop $(abspath $(KAFKA_DIR))' EXIT && \
	  export KAFKA_BOOTSTRAP_SERVERS=$$bootstrap CHURNSIGNAL_TEST_KAFKA_DIR=$(abspath $(KAFKA_DIR)) && \
	  $(PY) -m pytest tests/integration -q $(XDIST) -m 'not (serial or restarts_broker)' && \
	  $(PY) -m pytest tests/integration -q -m 'serial or restarts_broker'

# The unit tests and the worker pipeline against the compiled build (tests that replace a
# core function are skipped there: tests/conftest.py). --import-mode=append and
# PYTHONSAFEPATH: the installed package, not the source tree, is what they import.
test-compiled: $(CSTAMP)
	env -u KAFKA_BOOTSTRAP_SERVERS PYTHONSAFEPATH=1 $(CVENV)/bin/pytest -q -p no:cacheprovider \
	  --import-mode=append $(XDIST) tests/unit tests/integration/test_pipeline.py tests/integration/test_hostile_input.py

compose-check:
	@if docker compose version >/dev/null 2>&1; then docker compose config -q; \
	elif command -v docker-compose >/dev/null; then docker-compose config -q; \
	else echo "compose-check: no docker compose here, skipped (CI installs it)"; fi

test: lint compose-check test-tansu test-kafka test-compiled

clean:
	rm -rf $(VENV) $(CVENV) build .cache .churnsignal .pytest_cache
