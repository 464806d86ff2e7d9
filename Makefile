# The two commands of the README: `make demo` and `make test`. Both create .venv on a fresh machine.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test demo demo-chat lint format clean

# espeak-ng speaks the shapes world for the speech stage (`mm data synth --kind speech`); installed when missing.
venv: $(STAMP)
	@command -v espeak-ng >/dev/null || (apt-get update && apt-get install -y espeak-ng) \
		|| echo "mm: could not install espeak-ng; the speech data needs it: sudo apt-get install espeak-ng" >&2

# Re-installs only when pyproject.toml or constraints.txt changed (the stamp is older than them). pyproject.toml
# gives ranges; constraints.txt the exact versions installed here.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Headless Chromium and its driver run the `mm serve` page test (tests/mm/test_serve_browser.py); installed when
# missing (the test is skipped, saying so, where they cannot be).
test: lint
	@(command -v chromium && command -v chromedriver) >/dev/null || (apt-get update && apt-get install -y chromium chromium-driver) \
		|| echo "mm: could not install chromium; the browser test needs it: sudo apt-get install chromium chromium-driver" >&2
	$(BIN)/pytest -q

demo: venv
	$(BIN)/mm demo --out runs/demo
	@echo "The chat stages (instruct LM, questions about images and videos; about 9 more minutes on the cached stages (measured on AMD EPYC)):"
	@echo "  $(BIN)/mm demo --modality chat --out runs/demo    (or: make demo-chat)"

demo-chat: venv
	$(BIN)/mm demo --modality chat --out runs/demo

clean:
	rm -rf $(VENV) runs
