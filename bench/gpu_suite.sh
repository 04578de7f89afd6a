#!/usr/bin/env bash
# One-shot GPU suite (issue 17): on a machine with one CUDA GPU, install what is missing
# (offline: from a wheel folder, see bench/gpu_wheels.sh), run every GPU test
# (pytest -m gpu) and the GPU benchmark, and write the results under OUTDIR:
#
#   bench/gpu_suite.sh OUTDIR
#
#   environment.txt   GPU, driver, torch and package versions
#   gpu_tests.xml     pytest's JUnit report; gpu_tests.json its counts per outcome
#   gpu_bench.json    bench/gpu_bench.py's rows; gpu_bench.png its chart
#   suite.log         everything printed; summary.json  what ran, in how many seconds
#
# Sized for 8 minutes on one H100: the tests get at most SUITE_TEST_S (300 s), the
# benchmark what is left of SUITE_TOTAL_S (450 s) and starts no compile once its budget
# is spent. Without an NVIDIA GPU it exits at once with status 2 and says why.
set -uo pipefail
out=${1:?usage: bench/gpu_suite.sh OUTDIR}
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
wheels=${CROSSFIELD_WHEELS:-.whl}
total=${SUITE_TOTAL_S:-450}
test_limit=${SUITE_TEST_S:-300}
start=$(date +%s)

if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_suite: no NVIDIA GPU here (nvidia-smi missing or finds no device); nothing run" >&2
    exit 2
fi
if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_suite: $python's torch sees no CUDA device (a CPU build?); nothing run" >&2
    exit 2
fi
mkdir -p "$out"
exec > >(tee "$out/suite.log") 2>&1

# Offline install into a private folder: the wheels, then crossfield itself as links to
# this checkout (its packages map to the top-level folders, see pyproject.toml).
site=$(mktemp -d /tmp/crossfield-site.XXXXXX)
if compgen -G "$wheels/*.whl" >/dev/null; then
    "$python" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir \
        --target "$site" "$wheels"/*.whl || echo "gpu_suite: installing $wheels failed"
else
    echo "gpu_suite: no wheels in $wheels (bench/gpu_wheels.sh); using what is installed"
fi
mkdir -p "$site/crossfield"
cp crossfield/*.py "$site/crossfield/"
for package in model training server client proto; do
    ln -s "$PWD/$package" "$site/crossfield/$package"
done
ln -s "$PWD/proto/crossfield/v1" "$site/crossfield/v1"
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore

{
    nvidia-smi
    "$python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))'
    "$python" -m pip list 2>/dev/null | grep -i -E "torch|e3nn|vesin|cuequivariance|mace|numpy|grpcio|protobuf|ase"
    "$python" -m pip list --path "$site" 2>/dev/null
} > "$out/environment.txt" 2>&1

echo "== GPU tests (limit ${test_limit} s)"
timeout "$test_limit" "$python" -m pytest tests -m gpu -q -o addopts=-ra -p no:cacheprovider \
    --timeout 240 --junitxml "$out/gpu_tests.xml"
tests_status=$?
"$python" - "$out" <<'PY'
import json, sys, xml.etree.ElementTree as tree
out = sys.argv[1]
try:
    suite = tree.parse(f"{out}/gpu_tests.xml").getroot().iter("testsuite").__next__()
except (OSError, StopIteration, tree.ParseError) as err:
    counts = {"error": f"no JUnit report: {err}"}
else:
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
json.dump(counts, open(f"{out}/gpu_tests.json", "w"), indent=1)
print("gpu tests:", counts)
PY

left=$(( total - ($(date +%s) - start) ))
echo "== GPU benchmark (budget $(( left > 60 ? left - 60 : 0 )) s, limit ${left} s)"
bench_status=124
if (( left > 60 )); then
    timeout "$left" "$python" bench/gpu_bench.py --json "$out/gpu_bench.json" \
        --png "$out/gpu_bench.png" --budget-s $(( left - 60 )) \
        --cache-dir "$(mktemp -d /tmp/crossfield-cache.XXXXXX)"
    bench_status=$?
fi

elapsed=$(( $(date +%s) - start ))
printf '{"seconds": %d, "tests_status": %d, "bench_status": %d}\n' \
    "$elapsed" "$tests_status" "$bench_status" > "$out/summary.json"
echo "gpu_suite: done in ${elapsed} s (tests exit ${tests_status}, benchmark exit ${bench_status})"
exit $(( tests_status != 0 || bench_status != 0 ))
