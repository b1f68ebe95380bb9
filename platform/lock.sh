#!/usr/bin/env bash
# Write the container image's lock files: exact versions of everything the image installs.
#
#   pip install uv==0.13.9          # once, anywhere (or: pipx run uv ...)
#   platform/lock.sh                # writes platform/requirements-gpu.lock and -cpu.lock
#
# Inputs: the dependencies in pyproject.toml (torch pinned there: torch==2.13.0) and
# platform/image-requirements.in. Target: Linux x86_64 (manylinux_2_28), CPython 3.11, the
# image's platform, whatever machine runs this script.
# - requirements-gpu.lock: torch 2.13.0 from PyPI, the CUDA build, with the nvidia-* wheels it
#   needs pinned too (the CUDA runtime comes from them, not from the base image).
# - requirements-cpu.lock: torch 2.13.0+cpu from PyTorch's CPU index (TORCH_CPU_SOURCE), no
#   nvidia-* wheels. TORCH_CPU_SOURCE may be an index URL or a folder of wheels (--find-links).
# Run it again after changing a dependency and commit both files; tests/test_platform_files.py
# checks that every pin satisfies pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
UV=${UV:-uv}
TORCH_CPU_SOURCE=${TORCH_CPU_SOURCE:-https://download.pytorch.org/whl/cpu}
common=(pip compile pyproject.toml platform/image-requirements.in
  --python-version 3.11 --python-platform x86_64-manylinux_2_28 --quiet
  --no-emit-index-url --custom-compile-command "platform/lock.sh")

"$UV" "${common[@]}" --output-file platform/requirements-gpu.lock

if [[ -d "$TORCH_CPU_SOURCE" ]]; then
  cpu_source=(--find-links "$TORCH_CPU_SOURCE")
else
  cpu_source=(--index "$TORCH_CPU_SOURCE")
fi
echo "torch==2.13.0+cpu" > "${TMPDIR:-/tmp}/tsesnet-torch-cpu.txt"
"$UV" "${common[@]}" "${cpu_source[@]}" --override "${TMPDIR:-/tmp}/tsesnet-torch-cpu.txt" \
  --output-file platform/requirements-cpu.lock
rm -f "${TMPDIR:-/tmp}/tsesnet-torch-cpu.txt"
echo "wrote platform/requirements-gpu.lock and platform/requirements-cpu.lock"
