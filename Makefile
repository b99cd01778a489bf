# Two commands set everything up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
INSTALL_LOG := $(VENV)-install.log
WORK := work
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export GX_ANALYTICS_ENABLED := false
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1

.PHONY: run test lint bench clean venv browser stack

venv: $(STAMP)

# Reinstall only when the project's dependency list changes. pip's pages of output go to a
# log that is shown (its tail) only when the install fails.
$(STAMP): pyproject.toml
	@echo "installing the project into $(VENV) (first time: 2-3 minutes; log: $(INSTALL_LOG))"
	@( test -x $(PY) || $(PYTHON) -m venv $(VENV) ) > $(INSTALL_LOG) 2>&1 \
	  && $(PY) -m pip install --upgrade pip >> $(INSTALL_LOG) 2>&1 \
	  && $(PY) -m pip install -e '.[dev]' >> $(INSTALL_LOG) 2>&1 \
	  || { echo "install failed; the last lines of $(INSTALL_LOG):" >&2; tail -n 40 $(INSTALL_LOG) >&2; exit 1; }
	@touch $(STAMP)
	@echo "installed"

# The demo: a synthetic dataset, a local Prefect server in $(WORK)/prefect, two retrains.
run: $(STAMP)
	@mkdir -p $(WORK)/prefect
	@PREFECT_HOME=$(CURDIR)/$(WORK)/prefect $(PY) -m flows.demo --work $(WORK)

test: $(STAMP) browser stack
	$(PY) -m ruff check .
	$(PY) -m pytest -q

# The UI test drives Debian's chromium through Playwright (never `playwright install`).
browser:
	@test -x /usr/bin/chromium || { \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium; }

# The integration tests stand up the production layout (deployments/ha_stack.py) from Debian's
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

clean:
	rm -rf $(WORK)
