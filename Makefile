# Set-up and the two everyday commands. Both create the virtualenv in the
# checkout on first use and reinstall when pyproject.toml changes. `make test`
# also installs the Node.js driver and mongosh that the end-to-end client
# tests run, again whenever tests/clients/package-lock.json changes.

PYTHON ?= python3
VENV ?= .venv
INSTALLED := $(VENV)/.installed
CLIENTS := tests/clients
CLIENTS_INSTALLED := $(CLIENTS)/node_modules/.installed

.PHONY: run test bench venv clean

run: $(INSTALLED)
	$(VENV)/bin/mongoveil demo

test: $(INSTALLED) $(CLIENTS_INSTALLED)
	$(VENV)/bin/pytest

# Every benchmark in one run (about a quarter of an hour on 2 cores): prints the
# tables and writes bench/RESULTS.md. `python -m bench.suite --quick` is the
# smoke run that `make test` includes.
bench: $(INSTALLED)
	$(VENV)/bin/python -m bench.suite

venv: $(INSTALLED)

$(INSTALLED): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[dev]'
	touch $(INSTALLED)

# `npm ci` installs exactly the lock file's versions into a fresh node_modules.
# --ignore-scripts skips the packages' native build steps: mongosh's optional
# add-ons (machine id, DNS, ssh) are not needed to run scripts, and the driver's
# snappy and zstd add-ons come prebuilt in their npm packages.
$(CLIENTS_INSTALLED): $(CLIENTS)/package-lock.json
	npm ci --prefix $(CLIENTS) --ignore-scripts --no-audit --no-fund
	touch $(CLIENTS_INSTALLED)

clean:
	rm -rf $(VENV) run .pytest_cache .hypothesis $(CLIENTS)/node_modules
