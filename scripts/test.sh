#!/usr/bin/env bash
# Runs the whole test suite once per backend (jax, tensorflow, torch). Extra arguments go to
# pytest (e.g. -k presets). Exits non-zero if any backend fails.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTEST=${PYTEST:-.venv/bin/pytest}
export TF_CPP_MIN_LOG_LEVEL=3
# JAX compiles each train step with XLA (tens of seconds on a small CPU); tests that build the
# same trainer again (resume, CLI runs in subprocesses) reuse the program from this cache.
if [ -z "${JAX_COMPILATION_CACHE_DIR:-}" ]; then
  export JAX_COMPILATION_CACHE_DIR=$(mktemp -d)
  trap 'rm -rf "$JAX_COMPILATION_CACHE_DIR"' EXIT
fi
# Tests compile many small XLA programs and run each a few times: LLVM's optimisation passes
# cost more than they save here (measured: about half of a JAX trainer test's compile time).
export XLA_FLAGS="${XLA_FLAGS:---xla_backend_optimization_level=0}"
# Two pytest workers (pytest-xdist), each test file on one of them (module fixtures stay shared
# within a file): a serial run keeps about 1.2 of 2 cores busy (XLA compiles on one thread,
# tiny models run on few), two workers about 1.9; measured on 2 cores: the torch suite 450 ->
# 242 s. PYTEST_WORKERS=0 runs serially.
WORKERS=${PYTEST_WORKERS:-2}
if [ "$WORKERS" = "0" ]; then PARALLEL=(); else PARALLEL=(-n "$WORKERS" --dist loadfile); fi
status=0
for backend in ${BACKENDS:-jax tensorflow torch}; do
  echo "=== KERAS_BACKEND=$backend ==="
  start=$(date +%s)
  KERAS_BACKEND=$backend "$PYTEST" -q -p no:cacheprovider "${PARALLEL[@]}" "$@" || status=1
  echo "=== $backend took $(( $(date +%s) - start )) s ==="
done
exit $status
