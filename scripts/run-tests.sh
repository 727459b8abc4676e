#!/usr/bin/env bash
# The whole test suite, as `make test` runs it, in two phases:
#
#  1. every test not marked `serial`, on TEST_WORKERS pytest-xdist workers
#     (default 2). `--dist loadscope` keeps a module's tests on one worker, so a
#     module's shared fixture (e.g. the follow-up `brainline process` run of
#     tests/test_process.py) runs once. Each worker's numerical libraries
#     (ITK, OpenMP/torch, BLAS) run single-threaded: two workers that each
#     start a thread per core oversubscribe the cores, and ITK's and torch's
#     per-iteration thread synchronisation then costs more than it gains
#     (measured: the trained model's port test 111 s alone, 376 s beside a
#     second multi-threaded worker). The services a test starts inherit this.
#  2. the tests marked `serial` (wall-clock bounds, timing mechanisms such as
#     the listener's reactor pauses), alone and with the libraries' default
#     threads: a bound in seconds is only meaningful on an otherwise idle machine.
#
# Both phases always run; the script fails if either failed. Extra arguments go to
# both pytest calls (e.g. a test file); a phase that selects no test is not a failure.
# Usage: scripts/run-tests.sh PYTHON [pytest arguments...]
set -uo pipefail
python="$1"
shift
workers="${TEST_WORKERS:-2}"
status=0

phase() {
    local name="$1"
    shift
    echo "=== tests, $name"
    "$@"
    local rc=$?
    # 5: no test selected (e.g. a file with no serial test was named)
    if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then
        echo "=== tests, $name: FAILED (pytest exit status $rc)"
        status=1
    fi
}

phase "parallel phase ($workers workers)" \
    env OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 NUMEXPR_NUM_THREADS=1 \
        ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1 \
        "$python" -m pytest -ra -n "$workers" --dist loadscope --no-loadscope-reorder -m "not serial" --durations=30 "$@"
phase "serial phase (timing-bound tests, alone)" \
    "$python" -m pytest -ra -m serial --durations=10 "$@"
exit "$status"
