#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one run: CI has no GPU, so these run only where one is.
#
#   bash benchmarks/cuda_checks.sh [OUT_DIR]      # default: runs/cuda-checks
#
# Runs from the repository root with the python3 on PATH (PYTHON=... to choose another) and this
# checkout's src/ first on PYTHONPATH. The peers (pytorch_optimizer, heavyball) come from the
# `bench` extra. Each part has its own time limit, so one slow part cannot starve the others;
# each writes its own file in OUT_DIR, and the exit status counts the parts that failed.
set -uo pipefail
out=${1:-runs/cuda-checks}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
failed=0

part() {  # part NAME SECONDS COMMAND...: run COMMAND with a limit, its output into OUT/NAME.txt
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s): $*"
    local start=$SECONDS
    timeout "$limit" "$@" >"$out/$name.txt" 2>&1
    local rc=$?
    tail -n 25 "$out/$name.txt"
    echo "== $name: exit $rc after $((SECONDS - start)) s"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

W512=(--device cuda --width 512 --layers 8)
part gpu 30 bash -c "nvidia-smi -L; $py -c 'import torch; print(torch.__version__, torch.version.cuda)'"
# The issue-10 table: soaplab's optimizers against pytorch_optimizer.SOAP, no compile.
part step_time 120 "$py" benchmarks/step_time.py "${W512[@]}" --heavyball skip --windows 10 \
    --only adamw,muon,soap,soap_adaptive,soap_lowmem,shampoo,pytorch_optimizer.SOAP
part tests 90 "$py" -m pytest -q -p no:cacheprovider tests/optim/test_cuda.py
part parts 45 "$py" benchmarks/step_time.py "${W512[@]}" --parts
# The same table with exact Cholesky QR2 (FASTEST_QR is chosen from this and the parts).
part step_time_qr2 90 "$py" benchmarks/step_time.py "${W512[@]}" --heavyball skip \
    --windows 10 --qr cholesky_qr2 --only soap,soap_adaptive,pytorch_optimizer.SOAP
part step_time_w256 60 "$py" benchmarks/step_time.py --device cuda --heavyball skip \
    --windows 10 --only adamw,muon,soap,soap_adaptive,pytorch_optimizer.SOAP
# heavyball eager: its compiled mode autotunes (max-autotune) for minutes on these shapes.
part step_time_heavyball 120 "$py" benchmarks/step_time.py "${W512[@]}" --windows 10 \
    --heavyball eager --only soap,pytorch_optimizer.SOAP,heavyball.SOAP
echo "$failed part(s) failed"
exit "$failed"
