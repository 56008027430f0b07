#!/usr/bin/env bash
# The whole GPU check in one command, for a machine with a GPU and no network:
#
#     bash bench/gpu.sh          (from the repository root; about 9 minutes at most)
#
# 1. prints nvidia-smi and the versions of everything that can change a result;
# 2. prints the toolkit's and torch's CUDA versions, then builds the CUDA extension in place (ttkernels/_C*.so,
#    and the lean path's C++ node ttkernels/_lean*.so) with setup.py, timed; a failure is recorded and the
#    script goes on;
# 3. makes ttkernels importable as installed (an editable pip install without index, dependencies or a
#    second extension build) when it is not yet, so ttkernels._triton_kernels resolves;
# 4. runs the whole test suite with TTKERNELS_REQUIRE_CUDA_EXT=1, then the CUDA backend's small tests under
#    compute-sanitizer's memcheck (when the toolkit has it);
# 5. runs `python -m bench --preset layer` and `--preset model` on the GPU, then `python -m bench.ttm` (the
#    TT-matrix paths side by side) and `python -m bench.overhead` (per-call cost at one token, beside PEFT's
#    LoRA layer);
# 6. draws the figures and the README table with `python -m bench.plots` (the table only without
#    matplotlib).
#
# Every step runs under `timeout` (SIGINT first, so Python can finish and write what it has), with a limit
# that keeps time in reserve for the steps after it; the whole stays under GPU_SH_BUDGET_S seconds (540).
# Everything is written under bench/results/: one log per step, named gpu-<step>-<UTC time>.log, and a
# summary gpu-summary-<UTC time>.txt. When $OUT is set (the GPU runner's output folder), bench/results/ is
# copied there at the end. The exit status is non-zero when the tests failed (the benchmarks run anyway).
#
# Variables: PYTHON (default python), CUDA_HOME (/usr/local/cuda when it has nvcc), MAX_JOBS (16),
# TTKERNELS_CUDA_ARCHS (setup.py's default), BENCH_ARGS (extra arguments of both bench runs, default
# "--dtypes bfloat16"; set it empty for none), GPU_SH_BUDGET_S (540).

set -u

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2

PY=${PYTHON:-python}
command -v "$PY" >/dev/null 2>&1 || PY=python3
RESULTS=bench/results
# A GPU run is a publishing run: its rows go to the published folder (plain `python -m bench` writes to the
# git-ignored bench/out/).
export TTKERNELS_BENCH_RESULTS_DIR="$RESULTS"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
BUDGET_S=${GPU_SH_BUDGET_S:-540}
read -r -a BENCH_EXTRA <<<"${BENCH_ARGS---dtypes bfloat16}"
SUMMARY="$RESULTS/gpu-summary-$STAMP.txt"
mkdir -p "$RESULTS"
# As the Makefile: the toolkit in /usr/local/cuda unless CUDA_HOME says otherwise (setup.py would otherwise
# take the first nvcc on PATH, which may be a stray copy without the toolkit's headers).
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
	export CUDA_HOME=/usr/local/cuda
fi
STEPS=()
RC=0

section() {
	printf '\n======================================== %s (%ss elapsed)\n' "$1" "$SECONDS"
}

# limit CAP RESERVE: the seconds a step may take: at most CAP, leaving RESERVE seconds of the budget for the
# steps after it, and never less than 15.
limit() {
	local left=$((BUDGET_S - SECONDS - $2))
	((left > $1)) && left=$1
	((left < 15)) && left=15
	echo "$left"
}

# step NAME LOG LIMIT COMMAND...: runs COMMAND under timeout, its output on the terminal and in LOG; sets RC
# and adds a line to the summary.
step() {
	local name=$1 log=$2 lim=$3
	shift 3
	local start=$SECONDS outcome
	echo "+ $* (limit ${lim}s, log $log)"
	timeout --signal=INT --kill-after=20 "$lim" "$@" 2>&1 | tee "$log"
	RC=${PIPESTATUS[0]}
	if ((RC == 124 || RC == 137)); then
		outcome="TIMED OUT (limit ${lim}s)"
	elif ((RC != 0)); then
		outcome="FAILED (exit $RC)"
	else
		outcome="ok"
	fi
	STEPS+=("$(printf '%-12s %-26s %5ss  %s' "$name" "$outcome" $((SECONDS - start)) "$log")")
}

skip() {
	echo "$2"
	STEPS+=("$(printf '%-12s %-26s %5s   %s' "$1" "skipped" "-" "$2")")
}

versions() {
	echo "date (UTC): $(date -u '+%Y-%m-%d %H:%M:%S')    host: $(hostname)    git: $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
	git status --short 2>/dev/null | head -20
	echo
	nvidia-smi || echo "nvidia-smi: not available"
	echo
	local nvcc="${CUDA_HOME:+$CUDA_HOME/bin/}nvcc"
	echo "CUDA_HOME=${CUDA_HOME:-unset}"
	if command -v "$nvcc" >/dev/null 2>&1; then
		"$nvcc" --version | tail -2
	else
		echo "nvcc not found ($nvcc)"
	fi
	echo
	"$PY" - <<'EOF'
import importlib, platform

print(f"python        {platform.python_version()}  ({platform.platform()})")
for name in ("torch", "triton", "peft", "transformers", "matplotlib", "setuptools", "ninja", "numpy", "pytest"):
    try:
        print(f"{name:<13} {getattr(importlib.import_module(name), '__version__', '?')}")
    except Exception as e:
        print(f"{name:<13} not importable ({type(e).__name__}: {e})")
import torch

print(f"torch cuda    {torch.version.cuda}   available: {torch.cuda.is_available()}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"gpu {i}         {p.name}  sm_{p.major}{p.minor}  {p.total_memory / 2**30:.1f} GiB  {p.multi_processor_count} SMs")
EOF
}
export -f versions
export PY

# ---------------------------------------------------------------------------------------------------------
section "machine and versions"
step versions "$RESULTS/gpu-versions-$STAMP.log" "$(limit 60 420)" bash -c versions

section "build the CUDA extension in place (setup.py build_ext --inplace)"
# Both CUDA versions, before anything is compiled: setup.py builds where torch's own cpp_extension check accepts
# the toolkit (another minor version only warns) and otherwise says why.
NVCC_BIN="${CUDA_HOME:+$CUDA_HOME/bin/}nvcc"
echo "toolkit: $("$NVCC_BIN" --version 2>/dev/null | grep -o 'release [0-9.]*' || echo "nvcc not found ($NVCC_BIN)")"
echo "torch:   $("$PY" -c 'import torch; print(torch.__version__, "built with CUDA", torch.version.cuda)' 2>&1 | tail -1)"
step build "$RESULTS/gpu-build-$STAMP.log" "$(limit 200 300)" \
	env TTKERNELS_FORCE_CUDA_BUILD=1 MAX_JOBS="${MAX_JOBS:-16}" "$PY" setup.py build_ext --inplace
"$PY" -c "import ttkernels._ext as e; print('extension:', e.cuda_extension_path() or 'not built')"
"$PY" -c "import ttkernels.lean as l; print('lean C++ node (ttkernels._lean):', 'built' if l.NATIVE else 'not built')"

section "make ttkernels importable as installed"
if "$PY" -c "import ttkernels._triton_kernels" >/dev/null 2>&1; then
	skip install "ttkernels (with ttkernels._triton_kernels) is already importable"
else
	# No index: nothing is downloaded. The extension was built above; the install must not build it again.
	log="$RESULTS/gpu-install-$STAMP.log"
	step install "$log" "$(limit 60 270)" env TTKERNELS_SKIP_CUDA_BUILD=1 TTKERNELS_SKIP_HOST_BUILD=1 \
		"$PY" -m pip install --no-index --no-deps --no-build-isolation -e .
	if ((RC != 0)) && grep -q externally-managed "$log"; then
		# A system Python refuses pip installs (PEP 668); this machine is disposable.
		step install "$log" "$(limit 60 270)" env TTKERNELS_SKIP_CUDA_BUILD=1 TTKERNELS_SKIP_HOST_BUILD=1 PIP_BREAK_SYSTEM_PACKAGES=1 \
			"$PY" -m pip install --no-index --no-deps --no-build-isolation -e .
	fi
fi

section "tests (TTKERNELS_REQUIRE_CUDA_EXT=1)"
step tests "$RESULTS/gpu-tests-$STAMP.log" "$(limit 240 200)" \
	env TTKERNELS_REQUIRE_CUDA_EXT=1 "$PY" -m pytest -q tests
TESTS_RC=$RC

section "compute-sanitizer memcheck of the CUDA backend's tests"
SANITIZER="${CUDA_HOME:+$CUDA_HOME/bin/}compute-sanitizer"
MEMCHECK_RC=
if command -v "$SANITIZER" >/dev/null 2>&1; then
	# The small shapes only: memcheck slows every launch down by orders of magnitude.
	step memcheck "$RESULTS/gpu-memcheck-$STAMP.log" "$(limit 90 170)" \
		"$SANITIZER" --tool memcheck --error-exitcode 3 --print-limit 20 \
		env TTKERNELS_REQUIRE_CUDA_EXT=1 "$PY" -m pytest -q -x tests/test_cuda_backend.py \
		-k "not real_shapes and not compiles_fullgraph"
	MEMCHECK_RC=$RC
else
	skip memcheck "compute-sanitizer not found ($SANITIZER)"
fi

section "benchmark: layer preset"
step bench-layer "$RESULTS/gpu-bench-layer-$STAMP.log" "$(limit 240 180)" \
	"$PY" -m bench --preset layer --device cuda "${BENCH_EXTRA[@]}"

section "benchmark: model preset"
step bench-model "$RESULTS/gpu-bench-model-$STAMP.log" "$(limit 150 100)" \
	"$PY" -m bench --preset model --device cuda "${BENCH_EXTRA[@]}"

section "benchmark: TT-matrix adapters (python -m bench.ttm)"
step bench-ttm "$RESULTS/gpu-bench-ttm-$STAMP.log" "$(limit 90 50)" "$PY" -m bench.ttm --device cuda

section "per-call overhead at one token (python -m bench.overhead)"
step bench-overhead "$RESULTS/gpu-bench-overhead-$STAMP.log" "$(limit 45 15)" \
	"$PY" -m bench.overhead --device cuda --reps 100 --rounds 11 --out "$RESULTS"

section "figures and the README table (python -m bench.plots)"
rm -f "$RESULTS/plots/"*-cuda.png "$RESULTS/plots/"*-cuda.md
FIGURES=()
if ! "$PY" -c "import matplotlib" >/dev/null 2>&1; then
	echo "matplotlib is not installed: the table only, no figures (draw them elsewhere: python -m bench.plots)"
	FIGURES=(--no-figures)
fi
step plots "$RESULTS/gpu-plots-$STAMP.log" "$(limit 60 0)" \
	"$PY" -m bench.plots --device-type cuda --out "$RESULTS/plots" "${FIGURES[@]}"
if [ -f "$RESULTS/plots/layer-table-cuda.md" ]; then
	cat "$RESULTS/plots/layer-table-cuda.md"
fi

# ---------------------------------------------------------------------------------------------------------
section "summary"
{
	echo "bench/gpu.sh $STAMP: $SECONDS s in all (budget $BUDGET_S s)"
	printf '%s\n' "${STEPS[@]}"
	if ((TESTS_RC == 0)); then echo "tests: passed"; else echo "tests: FAILED (exit $TESTS_RC)"; fi
	case "$MEMCHECK_RC" in
	"") echo "memcheck: not run" ;;
	0) echo "memcheck: clean" ;;
	*) echo "memcheck: FAILED (exit $MEMCHECK_RC; 3 means errors were found)" ;;
	esac
} | tee "$SUMMARY"

if [ -n "${OUT:-}" ]; then
	mkdir -p "$OUT" && cp -r "$RESULTS"/. "$OUT"/ && echo "copied $RESULTS/ to $OUT/"
fi

((TESTS_RC == 0)) || exit 1
exit 0
