# The two commands of the README. Both run the idempotent set-up first (.venv, default target, data).
PY := .venv/bin

.PHONY: setup demo test test-fast lint bench reproduce scaling

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY)/draftopd demo

# The scaling study's best recipe, Draft-OPD and its matched SFT control from it, benchmarked (docs/RESULTS.md 8)
reproduce: setup
	$(PY)/draftopd demo --config configs/reproduce.yaml

# tau of DFlash and EAGLE-3 against SFT tokens (after `make reproduce`: its data, and its SFT as the largest EAGLE-3 budget)
scaling: setup
	bash scripts/scaling_study.sh runs/reproduce/data runs/scaling

test: setup
	$(PY)/ruff check src tests
	$(PY)/pytest -q

# the fast tier: in-process tests on tiny targets (no subprocesses, no demo, no real default target)
test-fast: setup
	$(PY)/pytest -q -m "not slow"

lint: setup
	$(PY)/ruff check src tests
	$(PY)/ruff format --check src tests

bench: setup
	$(PY)/draftopd bench --json runs/bench.json
