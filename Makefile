.PHONY: setup test test-fast demo bench
setup:
	bash scripts/setup.sh
test:
	.venv/bin/python -m pytest -q
test-fast:
	.venv/bin/python -m pytest -q -m "not slow"
demo:
	.venv/bin/codedistill demo
bench:
	.venv/bin/python benchmarks/sandbox_throughput.py
