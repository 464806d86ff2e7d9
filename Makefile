# The two commands of the README: `make demo` and `make test`. Both create .venv on a fresh machine.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test demo demo-chat lint format clean gpu-wheels

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

# Wheels for a machine with its own torch on Python 3.12 (a lent GPU): what scripts/gpu_check.sh needs beyond it,
# listed in scripts/gpu_wheels.txt, into .gpu-wheels/ (ignored; about 53 MiB). Then, on that machine:
#   scripts/gpu_check.sh OUT        (it installs .gpu-wheels/*.whl into a temporary folder)
GPU_PLATFORMS := $(foreach p,manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux2010_x86_64 manylinux_2_12_x86_64 manylinux1_x86_64,--platform $(p))
gpu-wheels:
	rm -rf .gpu-wheels
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(GPU_PLATFORMS) -d .gpu-wheels -r scripts/gpu_wheels.txt
	@echo "mm: $$(ls .gpu-wheels/*.whl | wc -l) wheels, $$(du -sh .gpu-wheels | cut -f1) in .gpu-wheels/"

clean:
	rm -rf $(VENV) runs .gpu-wheels
