#!/usr/bin/env bash
# Builds llama.cpp's `llama-server` from the llama-cpp-python source package on PyPI: the very llama.cpp that
# chatwire's engine runs, so the benchmark compares servers, not llama.cpp versions. Only the llama-server
# target is compiled, statically, into one binary: about 7 minutes on 2 cores, once per machine (cached).
# Usage: build_llama_server.sh <llama-cpp-python version> <install prefix> <python with pip>
# LLAMA_CPP_CFLAGS: extra compiler flags, the engine's (the Makefile passes them: no AMX).
set -euo pipefail
version=$1 prefix=$2 python=$3
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$python" -m pip download --quiet --no-binary :all: --no-deps --dest "$work" "llama-cpp-python==$version"
tar xzf "$work"/llama_cpp_python-"$version".tar.gz -C "$work"
source_dir="$work/llama_cpp_python-$version/vendor/llama.cpp"
cmake -S "$source_dir" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_OPENSSL=OFF -DCMAKE_C_FLAGS="${LLAMA_CPP_CFLAGS:-}" -DCMAKE_CXX_FLAGS="${LLAMA_CPP_CFLAGS:-}" \
  >"$work/configure.log"
cmake --build "$work/build" --target llama-server -j "${CMAKE_BUILD_PARALLEL_LEVEL:-2}" >"$work/build.log" ||
  { tail -40 "$work/build.log"; exit 1; }
mkdir -p "$prefix/bin"
cp "$work/build/bin/llama-server" "$prefix/bin/llama-server.tmp"
mv "$prefix/bin/llama-server.tmp" "$prefix/bin/llama-server"
echo "built $prefix/bin/llama-server (llama.cpp of llama-cpp-python $version)"
