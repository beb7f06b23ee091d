#!/usr/bin/env bash
# The GPU checks of tcmlib in one command: the first checks of a training run on the GPU (gpu_smoke.py:
# fit steps of the ResNet-50 CUB recipe in fp16 and bf16, the GPU's step rate against the data loader's,
# evaluate at N = 60,000 and the losses at B = 4,000 against float64 on the CPU), the tests that run only
# on CUDA, then the benchmarks on the GPU (the same code as on the CPU, but retrieval's running top-k is
# merged densely there, with no host sync per tile).  For a machine
# with CUDA and no internet, such as a GPU machine lent for a few minutes: every step has a time limit,
# and a failed step does not stop the others (the exit status says whether any failed).
#
#   bash benchmarks/gpu_check.sh            # smoke + tests + TCM, retrieval and OPIS benchmarks: about 10 minutes
#   bash benchmarks/gpu_check.sh quick      # smoke + tests + the benchmarks at small sizes: at most QUICK_BUDGET s (450)
#   DEVICE=cpu bash benchmarks/gpu_check.sh quick   # a dry run here (gpu_smoke.py --dry-run: tiny sizes)
#
# Expected on an H100 (estimates; nothing has run on a GPU yet): smoke 2-3 min, tests 1-2 min, the three
# quick benchmarks under a minute each: about 5-6 minutes, within the 8 a quick check may take.
#
# It runs with no package index: a test file whose imports are missing (pytorch-metric-learning,
# hypothesis) is skipped with a line saying so, the TCM benchmark leaves pml out without it, the
# retrieval benchmark runs without pml / faiss (--no-pml), and gpu_smoke.py needs neither (a check
# whose module is missing, torchvision say, is skipped with a line saying so).  In quick mode every step's time limit
# is cut to what is left of QUICK_BUDGET, so the whole check ends within it.
#
# Logs go to $OUT (where a device tool collects files), else _build/gpu-check.  Needs python3 (or $PY)
# with torch (CUDA), numpy, scipy, tqdm and pytest.  What it lacks (pytorch-metric-learning, hypothesis,
# faiss-cpu) is installed from ./.whl when that folder holds their wheels, fetched beforehand where pip
# works, e.g. for Python 3.12:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#       pytorch-metric-learning hypothesis sortedcontainers attrs faiss-cpu
# (with .whl/ ignored by git, a device tool must be told to carry it along with the working tree).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
LOG=${OUT:-_build/gpu-check}
mkdir -p "$LOG"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_WAIT_POLICY=PASSIVE
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu runs the same steps here (a dry run of this script)
failed=()
skipped=()
if [ "${1:-}" = quick ]; then deadline=$((SECONDS + ${QUICK_BUDGET:-450})); else deadline=; fi

step() {  # step NAME SECONDS COMMAND...: run it with a time limit, its output to the screen and $LOG/NAME.txt
    local name=$1 limit=$2
    shift 2
    if [ -n "$deadline" ]; then  # quick: never past the budget
        local left=$((deadline - SECONDS))
        if [ "$left" -lt 10 ]; then
            echo "== $name SKIPPED (the quick budget is spent)"
            skipped+=("$name")
            return 0
        fi
        [ "$left" -lt "$limit" ] && limit=$left
    fi
    echo "== $name: $*"
    timeout "$limit" "$@" 2>&1 | tee "$LOG/$name.txt"
    local rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "== $name FAILED (exit $rc$([ "$rc" -eq 124 ] && echo ', time limit'))"
        failed+=("$name")
    fi
    return "$rc"
}

if compgen -G ".whl/*.whl" > /dev/null; then
    step wheels 120 "$PY" -m pip install -q --no-deps --no-index --find-links .whl .whl/*.whl
fi
step device 60 "$PY" -c "
import torch
print('torch', torch.__version__)
if '$DEVICE' == 'cuda':
    assert torch.cuda.is_available(), 'no CUDA device: run this on a machine with a GPU (DEVICE=cpu for a dry run)'
    print(torch.cuda.get_device_name(), torch.version.cuda)
" || exit 1

# the first checks of a training run on this device (a table; every number in $LOG/gpu_smoke.json)
smoke_size=--quick smoke_limit=300  # full: 20 fit steps, the CPU reference at N = 60,000 (minutes on the CPU)
if [ "$DEVICE" = cpu ]; then smoke_size=--dry-run; elif [ "${1:-}" != quick ]; then smoke_size= smoke_limit=600; fi
step smoke "$smoke_limit" "$PY" benchmarks/gpu_smoke.py --device "$DEVICE" $smoke_size --json "$LOG/gpu_smoke.json"

# the tests that skip without CUDA: retrieval, TCM (and its autocast), the one-call evaluation with OPIS;
# a file whose imports this machine lacks is left out (said, not failed)
test_files=()
for f in tests/test_retrieval.py tests/test_tcm_loss.py tests/test_evaluation.py; do
    if timeout 60 "$PY" -m pytest -q -p no:cacheprovider --collect-only "$f" > /dev/null 2>&1; then
        test_files+=("$f")
    else
        echo "== tests: $f SKIPPED (it does not import here: $("$PY" -m pytest -q -p no:cacheprovider \
            --collect-only "$f" 2>&1 | grep -m1 -o "No module named [^ ]*" || echo 'collection error'))"
        skipped+=("$f")
    fi
done
if [ ${#test_files[@]} -gt 0 ]; then
    step tests 300 "$PY" -m pytest -q -p no:cacheprovider -k cuda "${test_files[@]}"
fi
# pml in the TCM benchmark only where it imports (--pml-max-b 0 leaves it out)
if "$PY" -c "import pytorch_metric_learning" 2> /dev/null; then pml_b=2048; else pml_b=0; fi

if [ "${1:-}" = quick ]; then
    step tcm 90 "$PY" benchmarks/tcm_vs_pml.py --device "$DEVICE" --sizes 256 1024 --repeats 3 --pml-max-b "$pml_b"
    step retrieval 90 "$PY" benchmarks/retrieval_vs_pml.py --device "$DEVICE" --sizes 6000 --repeats 1 --no-pml
    step opis 90 "$PY" benchmarks/opis_cost.py --device "$DEVICE" --sizes 5000 --repeats 1 --no-report
else
    step tcm 240 "$PY" benchmarks/tcm_vs_pml.py --device "$DEVICE" --sizes 256 512 1024 4096 --pml-max-b "$pml_b"
    step retrieval 300 "$PY" benchmarks/retrieval_vs_pml.py --device "$DEVICE" --sizes 20000 60000 200000 --no-pml
    step opis 300 "$PY" benchmarks/opis_cost.py --device "$DEVICE" --sizes 20000 60000 200000 --repeats 3
fi

if [ ${#skipped[@]} -gt 0 ]; then
    echo "gpu_check: skipped: ${skipped[*]}"
fi
if [ ${#failed[@]} -gt 0 ]; then
    echo "gpu_check: FAILED: ${failed[*]} (logs in $LOG)"
    exit 1
fi
echo "gpu_check: all steps passed (logs in $LOG)"
