#!/usr/bin/env bash
# The CUDA check of issue #23 (docs/GPU_CHECK.md): every method for one round on MiniLM and
# SmolLM2 through the embedded broker, the causal LoRA step in bf16 autocast and fp32, NVML
# telemetry and ONNX Runtime's CUDA EP; one table on stdout, JSON under $OUT (bench/gpu_check.py).
#   scripts/gpu_check.sh --prepare     here, before a GPU session: wheels into .whl/, the models'
#                                      config and tokenizer files (no weights) into .gpu/
#   scripts/gpu_check.sh               on the GPU machine (no CUDA device: one line, exit 2)
#   scripts/gpu_check.sh --allow-cpu   the same checks on the CPU, a rehearsal
#   ... -- ARGS                        ARGS go to `python -m bench.gpu_check run` (--methods lora)
# Models are built from the carried configs with random weights: timings and memory are the
# architecture's, accuracy is meaningless.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python3}
site=${JETFED_GPU_SITE:-/tmp/site}
limit_bytes=$((64 * 1024 * 1024))
mode=run
run_args=()
allow_cpu=0
while [ "$#" -gt 0 ]; do
  case "$1" in
    --prepare) mode=prepare ;;
    --allow-cpu) allow_cpu=1; run_args+=(--allow-cpu) ;;
    --) shift; run_args+=("$@"); break ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1 (use --prepare, --allow-cpu or nothing)" >&2; exit 2 ;;
  esac
  shift
done
cd "$here"
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"

if [ "$mode" = prepare ]; then
  rm -rf .whl .gpu
  mapfile -t wheels < <("$python" -m bench.gpu_check wheels)
  platforms=()
  for n in 17 24 27 28 31 34 35; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
  "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" --platform manylinux2014_x86_64 -d .whl "${wheels[@]}"
  "$python" -m bench.gpu_check prepare-models --gpu-dir .gpu
  tree_bytes=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- | tail -n1 | cut -f1)
  carried_bytes=$(du -cb .whl .gpu | tail -n1 | cut -f1)
  total=$((tree_bytes + carried_bytes))
  echo "travels: working tree $((tree_bytes / 1048576)) MiB + .whl/.gpu $((carried_bytes / 1048576)) MiB = $((total / 1048576)) MiB (limit 64 MiB)"
  if [ "$total" -gt "$limit_bytes" ]; then
    echo "gpu_check.sh: over the 64 MiB the device tool carries" >&2
    exit 1
  fi
  exit 0
fi

# A machine without CUDA says so before anything is installed.
if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null \
  && [ "$allow_cpu" = 0 ]; then
  echo "no CUDA device: torch sees no GPU here (--allow-cpu rehearses the checks on the CPU)"
  exit 2
fi
# What this Python lacks comes from the carried wheels (the GPU image has no pydantic, paho-mqtt
# or amqtt); an environment that has them all (this repo's CPU machine) installs nothing.
if ! "$python" -c 'import pydantic, paho.mqtt, amqtt.broker, cryptography' 2>/dev/null; then
  if ! compgen -G ".whl/*.whl" >/dev/null; then
    echo "gpu_check.sh: jetfed's dependencies are missing and .whl/ is empty: run --prepare first" >&2
    exit 1
  fi
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:$site"
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
exec "$python" -m bench.gpu_check run --out "${OUT:-$here/runs/gpu_check}" "${run_args[@]}"
