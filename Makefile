# Set-up and the two everyday commands. Both create the virtualenv in the
# checkout on first use and reinstall when pyproject.toml changes.

PYTHON ?= python3
VENV ?= .venv
INSTALLED := $(VENV)/.installed

.PHONY: run test venv clean

run: $(INSTALLED)
	$(VENV)/bin/mongoveil demo

test: $(INSTALLED)
	$(VENV)/bin/pytest

venv: $(INSTALLED)

$(INSTALLED): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[dev]'
	touch $(INSTALLED)

clean:
	rm -rf $(VENV) run .pytest_cache .hypothesis
