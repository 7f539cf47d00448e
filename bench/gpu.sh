#!/usr/bin/env bash
# bench/gpu.py on a GPU machine with PyTorch and Triton but no diffusers and no internet (this workplace's
# device machine): install the wheels carried in .whl/, install tinyrpo, run; report and log go to $OUT.
#
#   bash bench/gpu.sh                          # all sections: $OUT/report.md, report.json, log.txt
#   bash bench/gpu.sh --sections variants      # any bench/gpu.py flags
#
# bench/README.md ("On a lent GPU") says how to fetch the diffusers wheel into .whl/ beforehand.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results/gpu-$(date +%F)}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "bench/gpu.sh: could not install .whl/*.whl"; exit 1; }
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
# --no-build-isolation: pip would otherwise fetch setuptools, and there is no internet. If this fails anyway,
# bench/gpu.py still imports tinyrpo from the checkout.
python3 -m pip install -q --no-deps --no-build-isolation -e . \
    || echo "bench/gpu.sh: warning: pip install -e . failed; running tinyrpo from the checkout"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv || true
export PYTHONUNBUFFERED=1
python3 bench/gpu.py --out "$out" "$@" 2>&1 | tee "$out/log.txt"
exit "${PIPESTATUS[0]}"
