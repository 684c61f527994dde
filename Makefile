# tiaoyu — top-level Makefile. `make demo` runs the whole pipeline on the bundled synthetic data;
# `make test` runs the quick suite (every unit and learning test, CPU); `make test-all` adds the long
# integration tests (the end-to-end recipe, multi-process runs, lm-eval parity) and is what CI runs.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TIAOYU  := $(BIN)/tiaoyu
# test processes (pytest-xdist; each test file stays in one process, so its fixtures are built once)
TEST_WORKERS ?= auto

.PHONY: venv test test-all test-goldens-caps demo demo-full bench clean

venv: $(VENV)/.installed

# what the demo needs (the package, the CPU build of PyTorch, matplotlib for its curves); `venv` adds the test
# and interop extras (transformers, peft, lm-eval, …) on top, so `make demo` does not wait for them.
# --no-compile: Python writes the bytecode of what it imports when it first imports it; compiling every
# file of torch at install time is most of the venv's time (docs/demo.md)
$(VENV)/.core: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --no-compile torch==2.13.0 -e '.[plot]'
	touch $@

$(VENV)/.installed: $(VENV)/.core
	$(BIN)/pip install -q --no-compile -e '.[dev]'
	touch $@

test: venv
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile -m "not integration" tests

test-all: venv
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile tests
	$(MAKE) test-goldens-caps

# the golden losses again with torch's generic and AVX2 CPU kernels (ATEN_CPU_CAPABILITY): they hold on
# CPUs without AVX-512 too (tests/test_stages.py; the tolerance is measured in benchmarks/RESULTS.md)
GOLDEN_CAPS ?= default avx2
test-goldens-caps: venv
	for cap in $(GOLDEN_CAPS); do \
	  echo "golden losses, ATEN_CPU_CAPABILITY=$$cap"; \
	  ATEN_CPU_CAPABILITY=$$cap $(BIN)/python -m pytest tests/test_stages.py -k golden; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no golden tests: failing" >&2; fi; \
	  if [ $$rc -ne 0 ]; then exit $$rc; fi; \
	done

# independent stages side by side, one process per core (each runs one torch thread). `demo` is the recipe with
# smaller budgets where the row stays beyond noise (lora 300 steps, reason 200, distill 200), is a baseline
# either way (the direct-answer baseline: 100 steps instead of 600, evaluated at its start and end only), or
# shows the stage running rather than a gain at either budget (agentic GRPO: 4 steps of 16 × 8 answers instead
# of 40 of 32 × 8, its own evaluation at its end only and on 16 problems — its row is the paired comparison's
# on 400; reason --rl: 20 steps instead of 40), and the first tool-SFT run 800 steps instead of 1,200,
# evaluated at its start and end only (the longest chain is pretrain → tool SFT → agentic GRPO). `demo-full`
# runs the recipe's own budgets. docs/demo.md has the demo's figures over seeds and CPU kernels, and its time.
JOBS ?= $(shell nproc 2>/dev/null || echo 2)
DEMO_BUDGETS ?= TOOLS_STEPS=800 TOOLS_GRPO_STEPS=4 TOOLS_GRPO_PROMPTS=16 TOOLS_GRPO_EVAL_EVERY=0 TOOLS_GRPO_EVAL_SIZE=16 TOOLS_EVAL_EVERY=0 REASON_RL_STEPS=20 \
  TOOLS_DIRECT_STEPS=100 TOOLS_DIRECT_EVAL_EVERY=0 LORA_STEPS=300 REASON_STEPS=200 DISTILL_STEPS=200
SEED ?= 0
demo: $(VENV)/.core
	$(MAKE) -j $(JOBS) -f recipes/tiny-cpu/Makefile all TIAOYU=$(abspath $(TIAOYU)) PYTHON=$(abspath $(BIN)/python) \
	  OUT=runs/demo SEED=$(SEED) $(DEMO_BUDGETS)
	@echo "outputs in runs/demo; next: $(TIAOYU) chat runs/demo/sft · $(TIAOYU) serve runs/demo/sft · open runs/demo/report/report.html"

demo-full: $(VENV)/.core
	$(MAKE) -j $(JOBS) -f recipes/tiny-cpu/Makefile all TIAOYU=$(abspath $(TIAOYU)) PYTHON=$(abspath $(BIN)/python) \
	  OUT=runs/demo-full SEED=$(SEED)
	@echo "outputs in runs/demo-full; next: $(TIAOYU) chat runs/demo-full/sft · $(TIAOYU) serve runs/demo-full/sft · open runs/demo-full/report/report.html"

bench: venv
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b; done

clean:
	rm -rf runs/demo runs/demo-full
