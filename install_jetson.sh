#!/usr/bin/env bash
# Take a JetPack 5, 6 or 7 Jetson (or, with --generic, any Linux box) to a running jetfed edge
# agent: NVIDIA's PyTorch for that JetPack in a venv, transformers/peft versions that accept it,
# jtop, onnxruntime-gpu, jetfed, an optional power mode, and the jetfed-edge systemd service.
#
#   sudo ./install_jetson.sh --broker mqtts://coordinator:8883 --username dev1 --password-file pw
#   ./install_jetson.sh --dry-run --broker mqtt://coordinator:1883     # print every step, change nothing
#
# Idempotent: every mutating step first checks whether its result is already there, so running
# it again with the same flags changes nothing. See docs/DEPLOY_JETSON.md and --help.
set -euo pipefail

# ---- Versions and sources: update here ------------------------------------------------------
# JetPack 5.1.x (L4T R35.2+, Ubuntu 20.04, Python 3.8): NVIDIA's PyTorch 2.1 wheel, as listed in
# NVIDIA's "PyTorch for Jetson" forum thread (forums.developer.nvidia.com/t/72048) and
# "Installing PyTorch for Jetson Platform" (docs.nvidia.com). PyPI's aarch64 torch is CPU-only.
TORCH_VERSION_JP5="2.1.0a0"
TORCH_WHEEL_JP5="https://developer.download.nvidia.com/compute/redist/jp/v512/pytorch/torch-2.1.0a0+41361538.nv23.06-cp38-cp38-linux_aarch64.whl"
PYTHON_JP5="3.8"
# JetPack 6.1/6.2 (L4T R36.4, Ubuntu 22.04, Python 3.10, CUDA 12.6): NVIDIA's PyTorch 2.5 wheel
# (same sources). It links libcusparseLt.so.0, which JetPack does not ship, and is built against
# numpy 1.x (numpy 2 breaks it). cuSPARSELt archive as in NVIDIA's and Torch-TensorRT's JetPack docs.
TORCH_VERSION_JP6="2.5.0a0"
TORCH_WHEEL_JP6="https://developer.download.nvidia.com/compute/redist/jp/v61/pytorch/torch-2.5.0a0+872d972e41.nv24.08.17622132-cp310-cp310-linux_aarch64.whl"
PYTHON_JP6="3.10"
CUSPARSELT_URL="https://developer.download.nvidia.com/compute/cusparselt/redist/libcusparse_lt/linux-aarch64/libcusparse_lt-linux-aarch64-0.6.3.2-archive.tar.xz"
# JetPack 7 (L4T R38 = 7.0/7.1 on Thor, R39 = 7.2 which adds Orin; Ubuntu 24.04, Python 3.12,
# CUDA 13, SBSA user space; the index holds builds for several Pythons): PyTorch's own CUDA 13.0 aarch64 wheels, which declare their CUDA
# libraries as pip dependencies. NVIDIA's Jetson AI Lab SBSA index (pypi.jetson-ai-lab.io/sbsa/cu130)
# hosts torch 2.9.1 too, but that wheel links NVPL and cuDSS without declaring them
# (pollen-robotics/microduck_rl#38): use it via --index-url only with those libraries installed.
TORCH_VERSION_JP7="2.9.1"
TORCH_INDEX_JP7="https://download.pytorch.org/whl/cu130"
# --generic (not a Jetson): CPU-only torch from PyTorch's CPU index (PyPI's default x86 torch
# pulls multi-GB CUDA libraries), the version the project is developed with (NOTES.md).
TORCH_VERSION_GENERIC="2.13.0"
TORCH_INDEX_GENERIC="https://download.pytorch.org/whl/cpu"
# transformers 5 silently disables torch < 2.6 (transformers/utils/import_utils.py: "Disabling
# PyTorch because PyTorch >= 2.6 is required"). transformers 4.46 and peft 0.13 are the last
# releases for Python 3.8; peft 0.17 is the last release made before transformers 5 existed.
# transformers 5.23 + peft 0.21.2 is the project's known-good pair (NOTES.md).
TRANSFORMERS_FOR_OLD_TORCH="transformers>=4.45,<5"
PEFT_FOR_OLD_TORCH="peft>=0.13,<0.18"
TRANSFORMERS_FOR_PY38="transformers>=4.45,<4.47"
PEFT_FOR_PY38="peft>=0.13,<0.14"
TRANSFORMERS_FOR_NEW_TORCH="transformers>=5,<6"
PEFT_FOR_NEW_TORCH="peft>=0.21"
NUMPY_FOR_NVIDIA_WHEELS="numpy<2"
# onnxruntime-gpu has no Jetson build on PyPI (microsoft/onnxruntime#20503): JetPack 5 uses the
# Jetson Zoo wheel (elinux.org/Jetson_Zoo#ONNX_Runtime; the link has no wheel name, so the file is
# saved under ORT_WHEEL_NAME_JP5), JetPack 6 and 7 NVIDIA's Jetson AI Lab indexes
# (dusty-nv/jetson-containers#1283). JetPack 7 builds are new: a failure there is a warning.
ORT_WHEEL_JP5="https://nvidia.box.com/shared/static/zostg6agm00fb6t5uisw51qi6kpcuwzd.whl"
ORT_WHEEL_NAME_JP5="onnxruntime_gpu-1.17.0-cp38-cp38-linux_aarch64.whl"
ORT_INDEX_JP6="https://pypi.jetson-ai-lab.io/jp6/cu126"
ORT_SPEC_JP6="onnxruntime-gpu==1.23.0"
ORT_INDEX_JP7="https://pypi.jetson-ai-lab.io/sbsa/cu130"
ORT_SPEC_JP7="onnxruntime-gpu"
# jetson-stats is installed system-wide: its jtop.service runs /usr/local/bin/jtop, and the
# client (in the venv, through system site packages) must match the service's major.minor.
JETSON_STATS_VERSION="7.2.2"

# ---- Fixed paths ----------------------------------------------------------------------------
SERVICE_NAME="jetfed-edge.service"
UNIT_PATH="/etc/systemd/system/${SERVICE_NAME}"
CONFIG_DIR="/etc/jetfed"
ENV_PATH="${CONFIG_DIR}/edge.env"
CONSTRAINTS_PATH="${CONFIG_DIR}/constraints.txt"
CACHE_DIR="/var/cache/jetfed-install"
JTOP_UNIT_PATH="/etc/systemd/system/jtop.service"
JTOP_BIN="/usr/local/bin/jtop"
JETSON_CLOCKS_BIN="/usr/bin/jetson_clocks"
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# ---- Options --------------------------------------------------------------------------------
BROKER=""
DEVICE_ID=""
MQTT_USERNAME=""
MQTT_PASSWORD=""
CA_FILE=""
CERT_FILE=""
KEY_FILE=""
EXPERIMENT=""
DATA_DIR="/var/lib/jetfed"
POWER_MODE=""
JETSON_CLOCKS=0
TORCH_INDEX_OVERRIDE=""
TORCH_WHEEL_OVERRIDE=""
TORCH_VERSION_OVERRIDE=""
ORT_INDEX_OVERRIDE=""
ORT_WHEEL_OVERRIDE=""
NO_ORT=0
VENV="/opt/jetfed/venv"
PYTHON="python3"
GENERIC=0
DRY_RUN=0
ROOT="/"
NO_SERVICE=0
CONFIG_ONLY=0
SOURCE=""
PACKAGE=""
SERVICE_USER="${SUDO_USER:-}"

usage() {
    cat <<'EOF'
Usage: install_jetson.sh [options]

Service configuration (written to /etc/jetfed/edge.env, mode 600):
  --broker URL           mqtt://HOST:1883 or mqtts://HOST:8883. Required unless
                         /etc/jetfed/edge.env exists (e.g. a `jetfed broker-config` device
                         bundle copied there), which is then kept as it is
  --device-id ID         device id (default: the host name)
  --username NAME        MQTT user name
  --password PW          MQTT password (visible in `ps`; prefer --password-file)
  --password-file FILE   read the MQTT password from the first line of FILE
  --ca-file FILE         CA certificate for mqtts://
  --cert-file FILE       client certificate (mutual TLS)
  --key-file FILE        client key (mutual TLS)
  --experiment NAME      serve only this experiment (default: whichever coordinator runs one)
  --data DIR             data directory, JETFED_DATA (default /var/lib/jetfed)
  --service-user NAME    account that runs the service (default: $SUDO_USER; never root)

Device tuning:
  --power-mode N         set nvpmodel mode N (AGX Orin: 0 MAXN, 1 15W, 2 30W, 3 50W); if nvpmodel
                         wants a reboot the answer is "no" and the mode applies after the next reboot
  --jetson-clocks        pin clocks to the maximum now and at every service start

Packages:
  --venv DIR             virtual environment (default /opt/jetfed/venv)
  --python PATH          interpreter for the venv (default python3)
  --source DIR           install jetfed from this checkout (default: this script's folder)
  --package SPEC         install jetfed from a pip requirement instead (e.g. jetfed==0.1.0)
  --index-url URL        install torch from this index instead of the JetPack default
  --torch-wheel URL|PATH install this torch wheel instead of the JetPack default
  --torch-version V      torch version the index/wheel provides (pinned in the constraints file)
  --ort-index-url URL    install onnxruntime-gpu from this index
  --ort-wheel URL|PATH   install this onnxruntime-gpu wheel
  --no-ort               skip onnxruntime-gpu
  --generic              not a Jetson: CPU torch from PyTorch's CPU index, psutil telemetry,
                         no jtop, no onnxruntime-gpu

Modes:
  --dry-run              print every step and the files it would write; change nothing
  --config-only          skip the packages: only power settings, edge.env and the unit
  --no-service           do not write, enable or start jetfed-edge.service
  --root DIR             read the device identity from DIR and write files under DIR; commands
                         that act on the running system are skipped (tests, image staging)
  -h, --help             this help

Environment: JETFED_UNAME_M overrides `uname -m` (tests).
EOF
}

# ---- Output helpers -------------------------------------------------------------------------
die() {
    printf 'install_jetson.sh: error: %s\n' "$1" >&2
    exit "${2:-1}"
}
warn() { printf '!! %s\n' "$1" >&2; }
note() { printf '   %s\n' "$1"; }
step() { printf '\n==> %s\n' "$1"; }
# Print a command so it can be pasted into a shell: plain words as they are, others quoted.
show_cmd() {
    local line=$1 arg
    shift
    for arg in "$@"; do
        if [[ "$arg" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
            line+=" ${arg}"
        elif [[ "$arg" != *"'"* ]]; then
            line+=" '${arg}'"
        else
            line+=" $(printf '%q' "$arg")"
        fi
    done
    printf '%s\n' "$line"
}

on_host() { [[ "$ROOT" == "/" ]]; }

# Path of an absolute target path under --root.
rooted() {
    if on_host; then printf '%s' "$1"; else printf '%s%s' "${ROOT%/}" "$1"; fi
}

# Run a command that changes the running system: printed always, executed unless --dry-run,
# skipped (with a note) when --root points elsewhere.
run() {
    if ((DRY_RUN)); then
        show_cmd "   [dry-run] +" "$@"
    elif ! on_host; then
        show_cmd "   [skipped: --root ${ROOT}] +" "$@"
    else
        show_cmd "   +" "$@"
        "$@"
    fi
}

# As run, feeding INPUT on stdin (answers a prompt non-interactively).
run_with_input() {
    local input=$1
    shift
    if ((DRY_RUN)); then
        show_cmd "   [dry-run] + (answering '${input}')" "$@"
    elif ! on_host; then
        show_cmd "   [skipped: --root ${ROOT}] +" "$@"
    else
        show_cmd "   + (answering '${input}')" "$@"
        "$@" <<<"$input"
    fi
}

# Write CONTENT to an absolute target path with MODE unless it is already there. SHOWN is what
# gets printed (secrets masked). Sets FILE_CHANGED=1 when the file is (or would be) written.
FILE_CHANGED=0
write_file() {
    local dest=$1 mode=$2 content=$3 shown=$4
    local path tmp
    path="$(rooted "$dest")"
    if [[ -f "$path" && -r "$path" ]] && [[ "$(cat "$path")" == "$content" ]] &&
        [[ "$(stat -c '%a' "$path")" == "$mode" ]]; then
        note "unchanged: ${dest}"
        return 0
    fi
    FILE_CHANGED=1
    if ((DRY_RUN)); then
        note "[dry-run] would write ${dest} (mode ${mode}):"
        printf '%s\n' "$shown" | sed 's/^/      | /'
        return 0
    fi
    note "writing ${path} (mode ${mode})"
    mkdir -p "$(dirname "$path")"
    tmp="$(mktemp "$(dirname "$path")/.jetfed.XXXXXX")"
    chmod "$mode" "$tmp"
    printf '%s\n' "$content" >"$tmp"
    mv -f "$tmp" "$path"
}

# ---- Argument parsing -----------------------------------------------------------------------
need_value() {
    [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value (see --help)"
}

parse_args() {
    while [[ $# -gt 0 ]]; do
        case "$1" in
        --broker) need_value "$@"; BROKER=$2; shift 2 ;;
        --device-id) need_value "$@"; DEVICE_ID=$2; shift 2 ;;
        --username) need_value "$@"; MQTT_USERNAME=$2; shift 2 ;;
        --password) need_value "$@"; MQTT_PASSWORD=$2; shift 2 ;;
        --password-file)
            need_value "$@"
            [[ -r "$2" ]] || die "--password-file ${2}: not a readable file"
            IFS= read -r MQTT_PASSWORD <"$2" || true
            [[ -n "$MQTT_PASSWORD" ]] || die "--password-file ${2}: the first line is empty"
            shift 2
            ;;
        --ca-file) need_value "$@"; CA_FILE=$2; shift 2 ;;
        --cert-file) need_value "$@"; CERT_FILE=$2; shift 2 ;;
        --key-file) need_value "$@"; KEY_FILE=$2; shift 2 ;;
        --experiment) need_value "$@"; EXPERIMENT=$2; shift 2 ;;
        --data) need_value "$@"; DATA_DIR=$2; shift 2 ;;
        --service-user) need_value "$@"; SERVICE_USER=$2; shift 2 ;;
        --power-mode) need_value "$@"; POWER_MODE=$2; shift 2 ;;
        --jetson-clocks) JETSON_CLOCKS=1; shift ;;
        --venv) need_value "$@"; VENV=$2; shift 2 ;;
        --python) need_value "$@"; PYTHON=$2; shift 2 ;;
        --source) need_value "$@"; SOURCE=$2; shift 2 ;;
        --package) need_value "$@"; PACKAGE=$2; shift 2 ;;
        --index-url) need_value "$@"; TORCH_INDEX_OVERRIDE=$2; shift 2 ;;
        --torch-wheel) need_value "$@"; TORCH_WHEEL_OVERRIDE=$2; shift 2 ;;
        --torch-version) need_value "$@"; TORCH_VERSION_OVERRIDE=$2; shift 2 ;;
        --ort-index-url) need_value "$@"; ORT_INDEX_OVERRIDE=$2; shift 2 ;;
        --ort-wheel) need_value "$@"; ORT_WHEEL_OVERRIDE=$2; shift 2 ;;
        --no-ort) NO_ORT=1; shift ;;
        --generic) GENERIC=1; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        --config-only) CONFIG_ONLY=1; shift ;;
        --no-service) NO_SERVICE=1; shift ;;
        --root) need_value "$@"; ROOT=$2; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown option '${1}' (see --help)" ;;
        esac
    done
}

absolute_file() {
    local flag=$1 path=$2
    [[ -f "$path" ]] || die "${flag} ${path}: no such file"
    (cd "$(dirname "$path")" && printf '%s/%s' "$(pwd)" "$(basename "$path")")
}

validate_root() {
    [[ -d "$ROOT" ]] || die "--root ${ROOT}: not a directory"
    ROOT="$(cd "$ROOT" && pwd)"
}

validate_args() {
    if [[ -n "$BROKER" ]] && ! [[ "$BROKER" =~ ^(mqtt|mqtts|tcp|ssl)://[A-Za-z0-9._-]+(:[0-9]{1,5})?/?$ ]]; then
        die "--broker '${BROKER}' must look like mqtt://HOST:1883 or mqtts://HOST:8883"
    fi
    if [[ -z "$DEVICE_ID" ]]; then
        if [[ -r "$(rooted /etc/hostname)" ]]; then
            DEVICE_ID="$(head -n 1 "$(rooted /etc/hostname)")"
        else
            DEVICE_ID="$(hostname)"
        fi
        DEVICE_ID="${DEVICE_ID%%.*}"
    fi
    [[ "$DEVICE_ID" =~ ^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$ ]] ||
        die "--device-id '${DEVICE_ID}' must be 1-64 letters, digits, '.', '_' or '-' (no '/', '+', '#')"
    local value
    for value in "$MQTT_USERNAME" "$MQTT_PASSWORD" "$EXPERIMENT"; do
        [[ "$value" != *$'\n'* ]] || die "--username/--password/--experiment must be one line"
    done
    [[ -z "$CA_FILE" ]] || CA_FILE="$(absolute_file --ca-file "$CA_FILE")"
    [[ -z "$CERT_FILE" ]] || CERT_FILE="$(absolute_file --cert-file "$CERT_FILE")"
    [[ -z "$KEY_FILE" ]] || KEY_FILE="$(absolute_file --key-file "$KEY_FILE")"
    [[ "$DATA_DIR" == /* && "$DATA_DIR" != *[[:space:]]* ]] ||
        die "--data '${DATA_DIR}' must be an absolute path without spaces"
    [[ "$VENV" == /* && "$VENV" != *[[:space:]]* ]] ||
        die "--venv '${VENV}' must be an absolute path without spaces"
    [[ -z "$POWER_MODE" || "$POWER_MODE" =~ ^[0-9]{1,2}$ ]] ||
        die "--power-mode '${POWER_MODE}' must be an nvpmodel mode number such as 0 or 2"
    if [[ "$JETPACK" == "generic" && (-n "$POWER_MODE" || "$JETSON_CLOCKS" == 1) ]]; then
        die "--power-mode and --jetson-clocks need a Jetson (they drive nvpmodel and jetson_clocks)"
    fi
    [[ -z "$SOURCE" || -z "$PACKAGE" ]] || die "--source and --package exclude each other"
    if [[ -n "$SOURCE" ]]; then
        [[ -f "$SOURCE/pyproject.toml" ]] || die "--source ${SOURCE}: no pyproject.toml there"
        SOURCE="$(cd "$SOURCE" && pwd)"
    elif [[ -z "$PACKAGE" ]]; then
        [[ -f "$SCRIPT_DIR/pyproject.toml" ]] ||
            die "no jetfed checkout next to this script: pass --source DIR or --package SPEC"
        SOURCE="$SCRIPT_DIR"
    fi
    [[ -z "$TORCH_INDEX_OVERRIDE" || -z "$TORCH_WHEEL_OVERRIDE" ]] ||
        die "--index-url and --torch-wheel exclude each other"
    [[ -z "$ORT_INDEX_OVERRIDE" || -z "$ORT_WHEEL_OVERRIDE" ]] ||
        die "--ort-index-url and --ort-wheel exclude each other"
    if ((!NO_SERVICE)); then
        [[ -n "$SERVICE_USER" && "$SERVICE_USER" != "root" ]] ||
            die "--service-user NAME is required (run through sudo, or name the non-root account that runs the service)"
        [[ "$SERVICE_USER" =~ ^[a-z_][a-z0-9_-]*[$]?$ ]] || die "--service-user '${SERVICE_USER}' is not a user name"
    fi
    if ((!DRY_RUN)) && on_host && [[ "$(id -u)" != "0" ]]; then
        die "run as root (sudo ./install_jetson.sh ...), or preview with --dry-run"
    fi
}

# ---- Platform detection ---------------------------------------------------------------------
JETPACK=""     # 5, 6, 7 or generic
L4T=""         # e.g. R36.4.3
JETSON_MODEL=""
ARCH=""

detect_platform() {
    ARCH="${JETFED_UNAME_M:-$(uname -m)}"
    local release_file model_file line major revision
    release_file="$(rooted /etc/nv_tegra_release)"
    model_file="$(rooted /proc/device-tree/model)"
    if [[ "$ARCH" != "aarch64" || ! -r "$release_file" ]]; then
        if ((GENERIC)); then
            JETPACK="generic"
            return 0
        fi
        die "this is not a Jetson (uname -m: ${ARCH}; $(rooted /etc/nv_tegra_release): $([[ -r "$release_file" ]] && echo present || echo missing)). Pass --generic to install a CPU-only edge agent (CPU torch, psutil telemetry)." 2
    fi
    line="$(head -n 1 "$release_file")"
    [[ "$line" =~ ^#\ R([0-9]+)\ .*REVISION:\ ([0-9]+(\.[0-9]+)*) ]] ||
        die "cannot parse ${release_file}: '${line}' (expected '# R36 (release), REVISION: 4.3, ...')"
    major="${BASH_REMATCH[1]}"
    revision="${BASH_REMATCH[2]}"
    L4T="R${major}.${revision}"
    JETSON_MODEL="unknown Jetson"
    [[ -r "$model_file" ]] && JETSON_MODEL="$(tr -d '\0' <"$model_file")"
    if ((GENERIC)); then
        JETPACK="generic"
        return 0
    fi
    case "$major" in
    35) JETPACK=5 ;;
    36) JETPACK=6 ;;
    3[89] | [4-9][0-9]) JETPACK=7 ;;
    *) die "L4T ${L4T} is not supported: jetfed needs JetPack 5.1+ (L4T R35), 6 (R36) or 7 (R38+); or pass --generic" 2 ;;
    esac
    local has_override=0
    [[ -n "$TORCH_INDEX_OVERRIDE$TORCH_WHEEL_OVERRIDE" ]] && has_override=1
    if [[ "$JETPACK" == 5 && "${revision%%.*}" -lt 2 && "$has_override" == 0 ]]; then
        die "L4T ${L4T} is JetPack 5.0: NVIDIA's torch 2.1 wheel needs JetPack 5.1 (R35.2+); upgrade JetPack or pass --torch-wheel/--index-url with --torch-version" 2
    fi
    if [[ "$JETPACK" == 6 && "${revision%%.*}" -lt 4 && "$has_override" == 0 ]]; then
        die "L4T ${L4T} is JetPack 6.0 (CUDA 12.2): NVIDIA's torch 2.5 wheel needs JetPack 6.1+ (R36.4); upgrade JetPack or pass --torch-wheel/--index-url with --torch-version" 2
    fi
}

# ---- Version choices ------------------------------------------------------------------------
PYTHON_EXPECTED=""      # exact X.Y the torch wheel is built for; empty = any
TORCH_VERSION=""
TORCH_WHEEL=""
TORCH_INDEX=""
TRANSFORMERS_SPEC=""
PEFT_SPEC=""
NUMPY_SPEC=""
ORT_WHEEL=""
ORT_WHEEL_NAME=""
ORT_INDEX=""
ORT_SPEC=""

# True when transformers 5 accepts this torch version (>= 2.6.0; 2.6.0rc1 does not count).
torch_supports_transformers5() {
    local version=$1 major minor patch rest
    [[ "$version" =~ ^([0-9]+)\.([0-9]+)(\.([0-9]+))?(.*)$ ]] || return 1
    major="${BASH_REMATCH[1]}"
    minor="${BASH_REMATCH[2]}"
    patch="${BASH_REMATCH[4]:-0}"
    rest="${BASH_REMATCH[5]%%+*}"
    ((major > 2 || (major == 2 && minor > 6))) && return 0
    ((major == 2 && minor == 6)) || return 1
    ((patch > 0)) && return 0
    [[ -z "$rest" || "$rest" == .post* ]]
}

choose_versions() {
    case "$JETPACK" in
    5) PYTHON_EXPECTED=$PYTHON_JP5 TORCH_VERSION=$TORCH_VERSION_JP5 TORCH_WHEEL=$TORCH_WHEEL_JP5
       ORT_WHEEL=$ORT_WHEEL_JP5 ORT_WHEEL_NAME=$ORT_WHEEL_NAME_JP5 NUMPY_SPEC=$NUMPY_FOR_NVIDIA_WHEELS ;;
    6) PYTHON_EXPECTED=$PYTHON_JP6 TORCH_VERSION=$TORCH_VERSION_JP6 TORCH_WHEEL=$TORCH_WHEEL_JP6
       ORT_INDEX=$ORT_INDEX_JP6 ORT_SPEC=$ORT_SPEC_JP6 NUMPY_SPEC=$NUMPY_FOR_NVIDIA_WHEELS ;;
    7) TORCH_VERSION=$TORCH_VERSION_JP7 TORCH_INDEX=$TORCH_INDEX_JP7
       ORT_INDEX=$ORT_INDEX_JP7 ORT_SPEC=$ORT_SPEC_JP7 ;;
    generic) TORCH_VERSION=$TORCH_VERSION_GENERIC TORCH_INDEX=$TORCH_INDEX_GENERIC ;;
    esac
    if [[ -n "$TORCH_INDEX_OVERRIDE" ]]; then
        TORCH_INDEX=$TORCH_INDEX_OVERRIDE TORCH_WHEEL="" PYTHON_EXPECTED=""
    fi
    if [[ -n "$TORCH_WHEEL_OVERRIDE" ]]; then
        TORCH_WHEEL=$TORCH_WHEEL_OVERRIDE TORCH_INDEX="" PYTHON_EXPECTED=""
    fi
    [[ -z "$TORCH_VERSION_OVERRIDE" ]] || TORCH_VERSION=$TORCH_VERSION_OVERRIDE
    if [[ -n "$ORT_INDEX_OVERRIDE" ]]; then
        ORT_INDEX=$ORT_INDEX_OVERRIDE ORT_WHEEL="" ORT_SPEC="onnxruntime-gpu"
    fi
    if [[ -n "$ORT_WHEEL_OVERRIDE" ]]; then
        ORT_WHEEL=$ORT_WHEEL_OVERRIDE ORT_WHEEL_NAME="" ORT_INDEX=""
    fi
    if [[ "$JETPACK" == "generic" ]] || ((NO_ORT)); then
        ORT_WHEEL="" ORT_INDEX=""
    fi
    if [[ "$PYTHON_EXPECTED" == "3.8" ]]; then
        TRANSFORMERS_SPEC=$TRANSFORMERS_FOR_PY38 PEFT_SPEC=$PEFT_FOR_PY38
    elif torch_supports_transformers5 "$TORCH_VERSION"; then
        TRANSFORMERS_SPEC=$TRANSFORMERS_FOR_NEW_TORCH PEFT_SPEC=$PEFT_FOR_NEW_TORCH
    else
        TRANSFORMERS_SPEC=$TRANSFORMERS_FOR_OLD_TORCH PEFT_SPEC=$PEFT_FOR_OLD_TORCH
    fi
}

constraints_text() {
    printf '# Written by install_jetson.sh: every pip call in %s uses it, so no dependency can\n' "$VENV"
    printf '# replace the JetPack torch or pull a transformers that would silently disable it.\n'
    printf 'torch==%s\n' "$TORCH_VERSION"
    [[ -z "$NUMPY_SPEC" ]] || printf '%s\n' "$NUMPY_SPEC"
    printf '%s\n%s\n' "$TRANSFORMERS_SPEC" "$PEFT_SPEC"
    if [[ "$JETPACK" != "generic" ]]; then printf 'jetson-stats==%s\n' "$JETSON_STATS_VERSION"; fi
}

print_plan() {
    local torch_from ort_from
    if [[ -n "$TORCH_WHEEL" ]]; then torch_from="wheel ${TORCH_WHEEL}"; else torch_from="index ${TORCH_INDEX}"; fi
    if [[ -n "$ORT_WHEEL" ]]; then
        ort_from="onnxruntime-gpu from wheel ${ORT_WHEEL}"
    elif [[ -n "$ORT_INDEX" ]]; then
        ort_from="${ORT_SPEC} from index ${ORT_INDEX}"
    elif [[ "$JETPACK" == "generic" ]]; then
        ort_from="none (--generic: no onnxruntime-gpu)"
    else
        ort_from="none (--no-ort)"
    fi
    step "Plan"
    if [[ "$JETPACK" == "generic" ]]; then
        note "platform     : generic ${ARCH} host (--generic): CPU torch, psutil telemetry, no jtop"
    else
        note "platform     : JetPack ${JETPACK} (L4T ${L4T}) on '${JETSON_MODEL}', ${ARCH}"
    fi
    note "python       : ${PYTHON}${PYTHON_EXPECTED:+ (the torch wheel needs Python ${PYTHON_EXPECTED})}"
    note "venv         : ${VENV} (--system-site-packages)"
    note "torch        : torch==${TORCH_VERSION} from ${torch_from}"
    note "transformers : ${TRANSFORMERS_SPEC}"
    note "peft         : ${PEFT_SPEC}"
    [[ -z "$NUMPY_SPEC" ]] || note "numpy        : ${NUMPY_SPEC}"
    note "onnxruntime  : ${ort_from}"
    if [[ "$JETPACK" == "generic" ]]; then
        note "telemetry    : psutil (no jtop service)"
    else
        note "telemetry    : jtop (jetson-stats==${JETSON_STATS_VERSION} system-wide, jtop.service, group jtop)"
    fi
    note "jetfed       : ${PACKAGE:-${SOURCE}$(jetfed_extra)}"
    if ((NO_SERVICE)); then
        note "service      : none (--no-service)"
    else
        note "service      : ${SERVICE_NAME} as ${SERVICE_USER}, env file ${ENV_PATH}"
    fi
    note "power        : nvpmodel mode ${POWER_MODE:-unchanged}; jetson_clocks $( ((JETSON_CLOCKS)) && echo on || echo unchanged)"
    ((!DRY_RUN)) || note "DRY RUN: nothing below is changed"
}

jetfed_extra() { [[ "$JETPACK" == "generic" ]] || printf '[jetson]'; }

# ---- Steps ----------------------------------------------------------------------------------
apt_packages_missing() {
    local pkg admindir
    admindir="$(rooted /var/lib/dpkg)"
    for pkg in "$@"; do
        if ! dpkg-query --admindir="$admindir" -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
            printf '%s\n' "$pkg"
        fi
    done
}

step_system_packages() {
    step "System packages"
    local wanted=(python3-venv python3-pip curl ca-certificates)
    [[ "$JETPACK" == "generic" ]] || wanted+=(libopenblas-dev)
    if ! command -v dpkg-query >/dev/null 2>&1; then
        warn "no dpkg/apt here: make sure ${wanted[*]} (or their equivalents) are installed"
        return 0
    fi
    local missing=()
    mapfile -t missing < <(apt_packages_missing "${wanted[@]}")
    if ((${#missing[@]} == 0)); then
        note "already installed: ${wanted[*]}"
        return 0
    fi
    run env DEBIAN_FRONTEND=noninteractive apt-get update
    run env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
}

step_cusparselt() {
    [[ "$JETPACK" == 6 ]] || return 0
    step "cuSPARSELt (NVIDIA's torch 2.5 wheel links libcusparseLt.so.0)"
    if [[ -e "$(rooted /usr/local/cuda/lib64/libcusparseLt.so.0)" ]] ||
        { on_host && ldconfig -p 2>/dev/null | grep -q 'libcusparseLt\.so\.0'; }; then
        note "already present: libcusparseLt.so.0"
        return 0
    fi
    local archive name
    archive="${CACHE_DIR}/$(basename "$CUSPARSELT_URL")"
    name="$(basename "$CUSPARSELT_URL" .tar.xz)"
    run mkdir -p "$CACHE_DIR"
    run curl -fSL --retry 3 -o "$archive" "$CUSPARSELT_URL"
    run tar -xJf "$archive" -C "$CACHE_DIR"
    run cp -a "${CACHE_DIR}/${name}/lib/." /usr/local/cuda/lib64/
    run cp -a "${CACHE_DIR}/${name}/include/." /usr/local/cuda/include/
    run ldconfig
}

# Installed version of a distribution for an interpreter, or nothing.
dist_version() {
    local python=$1 dist=$2
    [[ -x "$python" ]] || return 0
    "$python" - "$dist" <<'PY' 2>/dev/null || true
import sys
try:
    from importlib.metadata import version
    print(version(sys.argv[1]))
except Exception:
    pass
PY
}

# True when X.Y version of an interpreter (empty when it cannot run).
python_xy() {
    "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true
}

step_jtop() {
    [[ "$JETPACK" != "generic" ]] || return 0
    step "jetson-stats ${JETSON_STATS_VERSION} system-wide, jtop.service, group jtop"
    local installed=""
    on_host && installed="$(dist_version "$(command -v "$PYTHON" || true)" jetson-stats)"
    local pip_flags=()
    if on_host && "$PYTHON" -c 'import sys, sysconfig, os; sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")) else 1)' 2>/dev/null; then
        pip_flags+=(--break-system-packages)
    fi
    if [[ "$installed" == "$JETSON_STATS_VERSION" ]]; then
        note "already installed: jetson-stats ${installed}"
    else
        [[ -z "$installed" ]] || note "jetson-stats ${installed} installed; moving to ${JETSON_STATS_VERSION}"
        run "$PYTHON" -m pip install "${pip_flags[@]}" "jetson-stats==${JETSON_STATS_VERSION}"
    fi
    if [[ -f "$(rooted "$JTOP_UNIT_PATH")" && "$installed" == "$JETSON_STATS_VERSION" ]]; then
        note "already installed: jtop.service"
    else
        run env SUDO_USER="${SERVICE_USER:-${SUDO_USER:-root}}" "$JTOP_BIN" --install-service
        run systemctl restart jtop.service
    fi
    local user="${SERVICE_USER:-${SUDO_USER:-}}"
    [[ -n "$user" ]] || return 0
    if grep -Eq "^jtop:[^:]*:[^:]*:(.*,)?${user}(,.*)?$" "$(rooted /etc/group)" 2>/dev/null; then
        note "already in group jtop: ${user}"
    else
        run groupadd -f jtop
        run usermod -aG jtop "$user"
    fi
}

VENV_PY=""
step_venv() {
    step "Virtual environment ${VENV}"
    VENV_PY="${VENV}/bin/python"
    local cfg
    cfg="$(rooted "$VENV")/pyvenv.cfg"
    if ! on_host || ((DRY_RUN)); then
        local version
        version="$(python_xy "$PYTHON")"
        if [[ -n "$PYTHON_EXPECTED" && "$version" != "$PYTHON_EXPECTED" ]]; then
            warn "${PYTHON} is Python ${version:-missing}, the torch wheel needs ${PYTHON_EXPECTED}: the real run stops here (pass --python)"
        fi
    fi
    if [[ -f "$cfg" ]]; then
        grep -Eq '^include-system-site-packages *= *true' "$cfg" ||
            die "${VENV} exists without system site packages (jtop lives there): remove it or pass another --venv"
        note "already exists: ${VENV}"
    else
        if on_host && ((!DRY_RUN)); then
            local version
            version="$(python_xy "$PYTHON")"
            [[ -n "$version" ]] || die "--python ${PYTHON}: cannot run it"
            [[ -z "$PYTHON_EXPECTED" || "$version" == "$PYTHON_EXPECTED" ]] ||
                die "${PYTHON} is Python ${version} but the JetPack ${JETPACK} torch wheel needs Python ${PYTHON_EXPECTED}: pass --python /usr/bin/python${PYTHON_EXPECTED} (or --torch-wheel)"
        fi
        run "$PYTHON" -m venv --system-site-packages "$VENV"
    fi
    run "$VENV_PY" -m pip install --upgrade "pip>=23.1"
}

step_constraints() {
    step "Constraints file ${CONSTRAINTS_PATH}"
    local text
    text="$(constraints_text)"
    write_file "$CONSTRAINTS_PATH" 644 "$text" "$text"
}

pip_venv() { run "$VENV_PY" -m pip install -c "$CONSTRAINTS_PATH" "$@"; }

step_torch() {
    step "PyTorch ${TORCH_VERSION}"
    local installed
    installed="$(dist_version "$(rooted "$VENV_PY")" torch)"
    if [[ -n "$installed" && "${installed%%+*}" == "$TORCH_VERSION" ]]; then
        note "already installed: torch ${installed}"
    elif [[ -n "$TORCH_WHEEL" ]]; then
        pip_venv "$TORCH_WHEEL"
    else
        pip_venv --index-url "$TORCH_INDEX" "torch==${TORCH_VERSION}"
    fi
}

step_onnxruntime() {
    [[ -n "$ORT_WHEEL$ORT_INDEX" ]] || return 0
    step "onnxruntime-gpu"
    local venv_py installed
    venv_py="$(rooted "$VENV_PY")"
    if [[ -n "$(dist_version "$venv_py" onnxruntime)" ]]; then
        note "CPU onnxruntime found: it shares the import package with onnxruntime-gpu, removing it"
        run "$VENV_PY" -m pip uninstall -y onnxruntime
    fi
    installed="$(dist_version "$venv_py" onnxruntime-gpu)"
    if [[ -n "$installed" ]]; then
        note "already installed: onnxruntime-gpu ${installed}"
        return 0
    fi
    if ! install_onnxruntime; then
        warn "onnxruntime-gpu did not install (only the ONNX inference bench needs it); retry with --ort-wheel or --ort-index-url"
    fi
}

install_onnxruntime() {
    if [[ -z "$ORT_WHEEL" ]]; then
        pip_venv --index-url "$ORT_INDEX" "$ORT_SPEC"
        return
    fi
    local wheel=$ORT_WHEEL
    if [[ -n "$ORT_WHEEL_NAME" ]]; then
        # The Jetson Zoo link has no wheel file name, which pip needs: save it under one.
        wheel="${CACHE_DIR}/${ORT_WHEEL_NAME}"
        run mkdir -p "$CACHE_DIR" || return 1
        run curl -fSL --retry 3 -o "$wheel" "$ORT_WHEEL" || return 1
    fi
    pip_venv "$wheel"
}

step_jetfed() {
    step "jetfed"
    if [[ -n "$PACKAGE" ]]; then
        pip_venv "$PACKAGE"
    else
        pip_venv "${SOURCE}$(jetfed_extra)"
    fi
}

# transformers 5 disables torch < 2.6 with only a log line: fail loudly instead.
VERIFY_PY='import torch, transformers, peft; from transformers.utils import is_torch_available as ok; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "transformers", transformers.__version__, "peft", peft.__version__); assert ok(), "transformers disabled this torch: wrong pin"'

step_verify() {
    step "Check: transformers sees torch"
    run "$VENV_PY" -c "$VERIFY_PY"
    if [[ "$JETPACK" != "generic" ]] && on_host && ((!DRY_RUN)); then
        "$VENV_PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' ||
            warn "torch does not see CUDA: check the torch wheel matches this JetPack (see docs/DEPLOY_JETSON.md)"
    fi
}

step_power() {
    [[ -n "$POWER_MODE" ]] || ((JETSON_CLOCKS)) || return 0
    step "Power mode and clocks"
    if [[ -n "$POWER_MODE" ]]; then
        local current=""
        if on_host && command -v nvpmodel >/dev/null 2>&1; then
            current="$(nvpmodel -q 2>/dev/null | tail -n 1 | tr -d '[:space:]')"
        fi
        if [[ "$current" == "$POWER_MODE" ]]; then
            note "already in nvpmodel mode ${POWER_MODE}"
        else
            # nvpmodel asks "reboot now? YES/yes to confirm" for some switches; anything else
            # keeps it from rebooting and the new mode takes effect after the next reboot.
            run_with_input "NO" nvpmodel -m "$POWER_MODE"
        fi
    fi
    if ((JETSON_CLOCKS)); then
        run "$JETSON_CLOCKS_BIN"
        note "the service also runs ${JETSON_CLOCKS_BIN} at every start (the setting does not survive reboots)"
    fi
}

# EnvironmentFile value: double-quoted with \ " $ ` backslash-escaped, which systemd and a
# shell decode the same way (systemd.exec(5); $ is never expanded by systemd).
env_value() {
    local value=${1//\\/\\\\}
    value=${value//\"/\\\"}
    value=${value//\$/\\\$}
    printf '"%s"' "${value//\`/\\\`}"
}

env_text() {
    local mask=$1 name value
    printf '# jetfed edge agent settings, read by %s (written by install_jetson.sh).\n' "$SERVICE_NAME"
    for name in BROKER DEVICE_ID USERNAME PASSWORD CA_FILE CERT_FILE KEY_FILE EXPERIMENT; do
        case "$name" in
        BROKER) value=$BROKER ;;
        DEVICE_ID) value=$DEVICE_ID ;;
        USERNAME) value=$MQTT_USERNAME ;;
        PASSWORD) value=$MQTT_PASSWORD; [[ -z "$value" || "$mask" == 0 ]] || value="********" ;;
        CA_FILE) value=$CA_FILE ;;
        CERT_FILE) value=$CERT_FILE ;;
        KEY_FILE) value=$KEY_FILE ;;
        EXPERIMENT) value=$EXPERIMENT ;;
        esac
        [[ -z "$value" ]] || printf 'JETFED_%s=%s\n' "$name" "$(env_value "$value")"
    done
}

unit_text() {
    local after="network-online.target" wants="network-online.target"
    if [[ "$JETPACK" != "generic" ]]; then
        after+=" jtop.service"
        wants+=" jtop.service"
    fi
    cat <<EOF
# jetfed edge agent (written by install_jetson.sh; rerun it rather than editing this file).
[Unit]
Description=jetfed edge agent (federated fine-tuning client)
Wants=${wants}
After=${after}
# Keep retrying while the broker or network is away.
StartLimitIntervalSec=0

[Service]
Type=simple
User=${SERVICE_USER}
EOF
    [[ "$JETPACK" == "generic" ]] || printf 'SupplementaryGroups=jtop\n'
    cat <<EOF
# The data folder is a unit setting, so a credential bundle from jetfed broker-config
# (devices/<id>/edge.env) can serve as the env file unchanged; the env file wins if it sets it.
Environment=JETFED_DATA=${DATA_DIR} PYTHONUNBUFFERED=1
EnvironmentFile=${ENV_PATH}
WorkingDirectory=${DATA_DIR}
EOF
    ((!JETSON_CLOCKS)) || printf 'ExecStartPre=+%s\n' "$JETSON_CLOCKS_BIN"
    cat <<EOF
ExecStart=${VENV}/bin/jetfed edge run
Restart=on-failure
RestartSec=10

[Install]
WantedBy=multi-user.target
EOF
}

step_service() {
    ((!NO_SERVICE)) || return 0
    step "Service ${SERVICE_NAME}"
    if on_host && ((!DRY_RUN)); then
        getent passwd "$SERVICE_USER" >/dev/null || die "--service-user ${SERVICE_USER}: no such user"
    fi
    local data_path group
    data_path="$(rooted "$DATA_DIR")"
    if [[ -d "$data_path" ]]; then
        note "already exists: ${DATA_DIR}"
    elif on_host; then
        group="$(id -gn "$SERVICE_USER" 2>/dev/null || echo "$SERVICE_USER")"
        run install -d -m 750 -o "$SERVICE_USER" -g "$group" "$DATA_DIR"
    elif ((DRY_RUN)); then
        note "[dry-run] would create ${DATA_DIR} (mode 750, owner ${SERVICE_USER})"
    else
        note "creating ${data_path} (mode 750; ownership is set on the device)"
        install -d -m 750 "$data_path"
    fi

    local changed=0
    if [[ -n "$BROKER" ]]; then
        FILE_CHANGED=0
        write_file "$ENV_PATH" 600 "$(env_text 0)" "$(env_text 1)"
        changed=$FILE_CHANGED
    elif [[ -f "$(rooted "$ENV_PATH")" ]]; then
        note "kept: ${ENV_PATH} (pass --broker to rewrite it)"
    else
        die "--broker URL is required on the first install (${ENV_PATH} does not exist yet)"
    fi
    FILE_CHANGED=0
    write_file "$UNIT_PATH" 644 "$(unit_text)" "$(unit_text)"
    ((FILE_CHANGED)) && changed=1

    if ((changed)); then run systemctl daemon-reload; fi
    if [[ -L "$(rooted "/etc/systemd/system/multi-user.target.wants/${SERVICE_NAME}")" ]]; then
        note "already enabled: ${SERVICE_NAME}"
    elif on_host || ((DRY_RUN)); then
        run systemctl enable "$SERVICE_NAME"
    else
        show_cmd "   +" systemctl --root="$ROOT" enable "$SERVICE_NAME"
        systemctl --root="$ROOT" enable "$SERVICE_NAME"
    fi
    # A new config or a reinstalled jetfed only takes effect after a restart.
    if ((changed || !CONFIG_ONLY)); then
        run systemctl restart "$SERVICE_NAME"
    else
        run systemctl start "$SERVICE_NAME"
    fi
}

print_next_steps() {
    step "Next steps"
    if ((DRY_RUN)); then
        note "this was a dry run: rerun without --dry-run (as root) to apply it"
        return 0
    fi
    ((NO_SERVICE)) || note "status:       systemctl status ${SERVICE_NAME}; logs: journalctl -u ${SERVICE_NAME} -f"
    note "check:        ${VENV}/bin/jetfed doctor"
    if [[ "$JETPACK" != "generic" ]]; then
        note "jtop group:   log out and in again before running jtop or jetfed as ${SERVICE_USER:-your user}"
        [[ -z "$POWER_MODE" ]] || note "power mode:   if nvpmodel asked for a reboot, reboot to apply mode ${POWER_MODE}"
    fi
    note "reconfigure:  rerun this script with new flags; it only changes what differs"
}

main() {
    parse_args "$@"
    validate_root
    detect_platform
    validate_args
    choose_versions
    print_plan
    if ((!CONFIG_ONLY)); then
        step_system_packages
        step_cusparselt
        step_jtop
        step_venv
        step_constraints
        step_torch
        step_onnxruntime
        step_jetfed
        step_verify
    fi
    step_power
    step_service
    print_next_steps
}

main "$@"
