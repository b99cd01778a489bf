# Two commands set everything up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Every dependency pinned with hashes, generated from pyproject.toml by `make lock` (pip-tools).
LOCK := requirements.lock
INSTALL_LOG := $(VENV)-install.log
WORK := work
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export GX_ANALYTICS_ENABLED := false
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1

.PHONY: run check test durations soak lint bench bench-gpu clean venv browser stack lock

venv: $(STAMP)

# Reinstall only when the project's dependencies change. The lock's exact versions and hashes are
# installed first (the same libraries on every host, hash-checked), then the project itself without
# resolving anything, built with the lock's setuptools and wheel (build isolation would download
# unpinned ones). pip's pages of output go to a log shown (its tail) only when the install fails.
$(STAMP): pyproject.toml $(LOCK)
	@echo "installing the project into $(VENV) (first time: 2-3 minutes; log: $(INSTALL_LOG))"
	@( test -x $(PY) || $(PYTHON) -m venv $(VENV) ) > $(INSTALL_LOG) 2>&1 \
	  && $(PY) -m pip install --require-hashes -r $(LOCK) >> $(INSTALL_LOG) 2>&1 \
	  && $(PY) -m pip install --no-deps --no-build-isolation -e . >> $(INSTALL_LOG) 2>&1 \
	  || { echo "install failed; the last lines of $(INSTALL_LOG):" >&2; tail -n 40 $(INSTALL_LOG) >&2; exit 1; }
	@touch $(STAMP)
	@echo "installed"

# The demo: a synthetic dataset, a local Prefect server in $(WORK)/prefect, two retrains.
run: $(STAMP)
	@mkdir -p $(WORK)/prefect
	@PREFECT_HOME=$(CURDIR)/$(WORK)/prefect $(PY) -m flows.demo --work $(WORK)

# The fast tier, before every commit: no Prefect server, worker, training beyond a few steps or
# fresh interpreter (tests/tiers.py marks those slow from the fixtures they use). Two xdist
# workers, each with its share of the cores for torch (tests/conftest.py): 2 min 1 s, 5 min 36 s serial.
check: $(STAMP) browser
	$(PY) -m ruff check .
	$(PY) -m pytest -q -m "not slow" -n 2

# Everything, on two xdist workers: most of the slow tier waits on servers, heartbeats and polls, so
# two modules at a time fill the two cores (28 min serial, docs/testing.md). A module stays on one
# worker (its clusters are module fixtures); tests/tiers.py hands out the long modules first.
# FILL_IDLE=1 adds a third worker that runs only fast-tier tests, each when a core is idle, until the
# slow tier is done (tests/idle_worker.py): for machines with cores to spare; on this 2-core one it
# measured even (docs/testing.md).
TEST_WORKERS = $(if $(FILL_IDLE),-n 3 --fill-idle,-n 2)
TEST_PYTEST = $(PY) -m pytest -q $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder
test: $(STAMP) browser stack
	$(PY) -m ruff check .
	$(TEST_PYTEST)

# Re-measures tests/durations.json, the seconds per module by which make test hands out its units
# of work, longest first (tests/tiers.py): make test's own run, recorded when it passes. After
# adding or reshaping modules; an unmeasured module is handed out first in its group meanwhile.
durations: $(STAMP) browser stack
	$(TEST_PYTEST) --record-durations tests/durations.json

# The soak test: a compressed calendar of nights, pushes and faults on the production shape
# (docs/reliability.md). make test runs 30 nights of it on one of its workers; this runs it alone,
# 90 nights by default; SOAK_NIGHTS=30 for a month, SOAK_SEED=N replays a calendar.
SOAK_NIGHTS ?= 90
soak: $(STAMP) stack
	PROTEIN_SOAK_NIGHTS=$(SOAK_NIGHTS) $(PY) -m pytest -q -s -p no:randomly tests/integration/test_soak.py

# The UI test drives Debian's chromium through Playwright (never `playwright install`).
browser:
	@test -x /usr/bin/chromium || { \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium; }

# Refresh the lock after changing pyproject.toml's dependencies (about 4 minutes; needs the registry).
lock:
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q pip-tools
	$(PY) -m piptools compile --quiet --extra dev --generate-hashes --allow-unsafe --strip-extras \
	  --no-emit-index-url --no-emit-find-links --output-file $(LOCK) pyproject.toml

# The integration tests stand up the production layout (deployments/ha_stack/) from Debian's
# PostgreSQL, Redis and nginx; it runs PostgreSQL as the unprivileged `nobody` when run as root.
stack:
	@missing=; for p in postgresql:/usr/lib/postgresql redis-server:/usr/bin/redis-server nginx:/usr/sbin/nginx; do \
		test -e $${p#*:} || missing="$$missing $${p%%:*}"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; fi

lint: $(STAMP)
	$(PY) -m ruff check .

bench: $(STAMP)
	$(PY) -m bench.run_all

bench-gpu: $(STAMP)
	$(PY) -m bench.gpu

clean:
	rm -rf $(WORK)
