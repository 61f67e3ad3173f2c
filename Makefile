# The two commands of the README. Each does its own set-up (scripts/setup.sh) first.
.PHONY: setup demo test bench clean

setup:
	@bash scripts/setup.sh

demo: setup
	@bash scripts/demo.sh

test: setup
	@.venv/bin/python -m pytest -q tests

bench: setup
	@.venv/bin/flt-mol bench attention --lengths 512 1024 2048 4096 8192 --batch 2 --out runs/bench_attention.json

clean:
	rm -rf .venv runs
