# phi3-export developer tasks. `make setup demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO := build/demo

.PHONY: setup test lint bench bench-full demo clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# Both cores (pytest-xdist; built fixtures are shared between the workers, see tests/conftest.py);
# progress per test file and the 10 slowest tests at the end.
test: setup
	$(BIN)/python -m pytest -n 2 --durations=10

lint: setup
	$(BIN)/ruff check phi3_export tests benchmarks

# Not run by CI (about 50 min): ours vs the ORT-GenAI builder (speed, memory),
# fp32/RTN/AWQ/builder accuracy on SmolLM2-135M in Phi-3 layout, `validate` on those
# artifacts, and the Core ML export of the same quantization; JSON under build/bench/.
bench: setup
	$(BIN)/pip install -q -e '.[dev,fixtures]'
	$(BIN)/python benchmarks/bench_export.py --out build/bench
	$(BIN)/python benchmarks/bench_awq.py --out build/bench
	$(BIN)/python benchmarks/bench_validate.py --out build/bench
	$(BIN)/python benchmarks/bench_coreml.py --out build/bench

# Not run by CI: full-size Phi-3-mini and Phi-3-medium shapes (random weights): export memory
# and time, int4 speed against the memory-bandwidth ceiling, the builder beside ours. Needs
# ~50 GB free disk under build/full (a shape without room is skipped) and about an hour.
bench-full: setup
	$(BIN)/python benchmarks/bench_full.py --out build/bench --work build/full

# The main job end to end on a built-in tiny checkpoint: quantize (ONNX + Core ML), chat,
# validate, report, app bundle + verify. No network, about a minute.
demo: setup
	rm -rf $(DEMO)
	$(BIN)/phi3-export fixture --recipe phi-3-mini-4k --train-steps 300 --hidden 128 --out $(DEMO)/checkpoint
	$(BIN)/phi3-export quantize --checkpoint $(DEMO)/checkpoint --bits 4 --format all --out $(DEMO)/out
	$(BIN)/phi3-export chat $(DEMO)/out/onnx-cpu --prompt "What does the for statement do?"
	$(BIN)/phi3-export validate $(DEMO)/out --reference $(DEMO)/checkpoint --json $(DEMO)/validate.json \
		--prompt-lengths 128 --new-tokens 32 --cache-dir $(DEMO)/cache
	$(BIN)/phi3-export report $(DEMO)/validate.json --out $(DEMO)/report
	$(BIN)/phi3-export package $(DEMO)/out --target android --out $(DEMO)/android-bundle --validate $(DEMO)/validate.json
	$(BIN)/phi3-export verify $(DEMO)/android-bundle

clean:
	rm -rf build
