# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test setup clean
demo: $(STAMP)
	$(VENV)/bin/medvit demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q --durations=25

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt scripts/setup.sh
	bash scripts/setup.sh

clean:
	rm -rf $(VENV) demo_out runs
