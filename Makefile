.PHONY: setup setup-vllm test test-fast demo bench
setup:
	bash scripts/setup.sh
setup-vllm:
	bash scripts/setup_vllm.sh
test:
	.venv/bin/python -m pytest -q
test-fast:
	.venv/bin/python -m pytest -q -m "not slow"
demo:
	.venv/bin/codedistill demo
bench:
	.venv/bin/python benchmarks/sandbox_throughput.py
