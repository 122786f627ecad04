.PHONY: setup setup-vllm lint test test-fast demo bench
setup:
	bash scripts/setup.sh
setup-vllm:
	bash scripts/setup_vllm.sh
lint:
	.venv/bin/python -m ruff check src tests
	.venv/bin/python -m ruff format --check src tests
	.venv/bin/python -m mypy src/codedistill/btp src/codedistill/execution src/codedistill/generation
test: lint
	.venv/bin/python -m pytest -q
test-fast: lint
	.venv/bin/python -m pytest -q -m "not slow"
demo:
	.venv/bin/codedistill demo
bench:
	.venv/bin/python benchmarks/sandbox_throughput.py
