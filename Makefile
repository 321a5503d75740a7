# geomon developer commands. Each target creates the virtual environment it needs when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The small CPU build on machines without a GPU is found by pip's local find-links; on a GPU machine the same
# pin resolves to the CUDA build. Override with `make demo TORCH_SPEC='torch>=2.3'` (the tests: TEST_TORCH_SPEC).
TORCH_SPEC ?= torch==2.13.0
# timm (ViT capture tests) needs torchvision, and no torchvision is built for the small CPU torch: the tests install
# the newest matching pair instead (a CUDA build of torch that also runs on the CPU; about a minute here).
TEST_TORCH_SPEC ?= torch torchvision
BASE_STAMP := $(VENV)/.geomon-base-installed
STAMP := $(VENV)/.geomon-installed
LINT_PATHS := geomon tests examples benchmarks

.PHONY: demo test test-gpu lint docs bench bench-overhead bench-gpu clean

# The demo needs the package and its command's extras (Lightning, TensorBoard, matplotlib, rich); the tests add the
# dev extras (wandb, triton, transformers, timm, ...) on top.
$(BASE_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[cli]"
	touch $(BASE_STAMP)

$(STAMP): $(BASE_STAMP)
	$(PY) -m pip install -q $(TEST_TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(BASE_STAMP)
	$(VENV)/bin/geomon demo

lint: $(STAMP)
	$(PY) -m ruff check $(LINT_PATHS)
	$(PY) -m ruff format --check $(LINT_PATHS)

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --quiet --site-dir $(VENV)/site

test: lint docs
	$(PY) -m pytest -n 2 -q

bench: $(STAMP)
	$(PY) benchmarks/attention_entropy_cpu.py

# Step-time overhead of GeomonCallback through two Lightning Trainers interleaved in blocks, GPT-2-small and tiny GPT
# shapes (results in benchmarks/results/cpu-trainer-overhead-<date>.md).
bench-overhead: $(STAMP)
	$(PY) benchmarks/trainer_overhead.py --threads 1 --shape gpt2-small tiny --measure-every 25 --profile 2

# On a CUDA machine: the kernel tests on the GPU (bf16/fp16 included); `make bench-gpu` then runs the kernel
# benchmarks and the Trainer overhead benchmark into ONE file, benchmarks/results/<device>-<date>.md, to commit as is
# (BENCH_GPU_ARGS=--tests also records the GPU tests' summary; --fast checks the scripts on any machine).
test-gpu: $(STAMP)
	$(PY) -m pytest -q tests/kernels tests/functional tests/metrics

BENCH_GPU_ARGS ?=
bench-gpu: $(STAMP)
	$(PY) benchmarks/bench_gpu.py $(BENCH_GPU_ARGS)

# No GPU needed: every kernel variant compiled for sm_90a and sm_80: registers, spills, shared memory, SASS
# instructions of the hot loop per unit of work, predicted share of the floor; fails on a broken budget.
.PHONY: kernel-report
kernel-report: $(STAMP)
	$(PY) benchmarks/kernel_report.py

clean:
	rm -rf $(VENV) site .pytest_cache .ruff_cache .hypothesis
