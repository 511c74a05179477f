#!/usr/bin/env bash
# Feature-extraction throughput on a CUDA machine: random-weight DiT-XL/2 (256 px), an
# SD-1.5-sized UNet (512 px) and an SDXL-sized UNet (1024 px), each in float32 and bfloat16,
# for the default audit's features (what its verdict reads) and for all 26, side by side.
# Needs nothing beyond the project's own set-up; the whole run is capped at 8 minutes.
#
#   bench/gpu.sh                 # all three models, fp32 and bf16
#   bench/gpu.sh --smoke         # the same code on tiny configs, on the CPU (a check of the script)
#   bench/gpu.sh --models dit-xl-2-256 --precisions bf16 --features verdict --seconds 60
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup
export PYTHONUNBUFFERED=1
case " $* " in
  *" --smoke "*|*" --device cpu "*) ;;
  *)
    if ! .venv/bin/python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
      echo "bench/gpu.sh: torch sees no CUDA device (torch $(.venv/bin/python -c 'import torch; print(torch.__version__)'))" >&2
      exit 2
    fi
    ;;
esac
# 12 (model, precision, feature set) runs of ~20 s timed plus warm-ups and model building: under 8 minutes.
exec timeout --signal=INT 480 .venv/bin/python bench/gpu_throughput.py "$@"
