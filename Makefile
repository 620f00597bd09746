# Two entry points (README): `make dev` runs the operator on the embedded local chain,
# `make test` runs the tests. Both install what they need first (scripts/bootstrap.sh).
.PHONY: setup dev test test-fast lint bench image ci clean

setup:
	@./scripts/bootstrap.sh

dev: setup
	.venv/bin/microvm-blueprint dev

test: setup
	.venv/bin/python -m pytest -q -ra

test-fast: setup
	.venv/bin/python -m pytest -q -ra -m "not qemu and not slow"

lint: setup
	.venv/bin/ruff check src tests bench
	.venv/bin/mypy

image: setup
	.venv/bin/microvm-blueprint image build

bench: setup
	.venv/bin/python -m bench

ci: lint test

clean:
	rm -rf .venv node_modules .cache .pytest_cache .mypy_cache .ruff_cache .devnet
