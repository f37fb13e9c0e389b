# The two commands of the README. Both run the idempotent set-up first (.venv, default target, data).
PY := .venv/bin

.PHONY: setup demo test lint bench

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY)/draftopd demo

test: setup
	$(PY)/ruff check src tests
	$(PY)/pytest -q

lint: setup
	$(PY)/ruff check src tests
	$(PY)/ruff format --check src tests

bench: setup
	$(PY)/draftopd bench --json runs/bench.json
