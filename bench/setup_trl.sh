#!/usr/bin/env bash
# The peer's own virtual environment, bench/.venv-trl (ignored by git): torch first (pinned, the CPU wheel where
# that is the machine's, so pip never pulls a multi-GB CUDA build), then TRL 1.13.0 -- the last release with
# trl.experimental.bco.BCOTrainer -- with the transformers / peft / bitsandbytes / accelerate / datasets
# releases qbco is tested against, pinned so both tools run the same model code and the same 4-bit kernels.
# Safe to run again.
set -euo pipefail
cd "$(dirname "$0")"
python=${PYTHON:-python3}
[ -x .venv-trl/bin/python ] || "$python" -m venv .venv-trl
.venv-trl/bin/python -c "import torch" 2>/dev/null || .venv-trl/bin/pip install --quiet torch==2.13.0
.venv-trl/bin/pip install --quiet \
    trl==1.13.0 \
    transformers==5.24.0 \
    peft==0.21.2 \
    bitsandbytes==0.50.2 \
    accelerate==1.15.0 \
    datasets==5.2.0
TRL_EXPERIMENTAL_SILENCE=1 .venv-trl/bin/python -c "
from trl.experimental.bco import BCOConfig, BCOTrainer
import trl, transformers, peft, bitsandbytes, torch
print('bench/.venv-trl: trl', trl.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__,
      'bitsandbytes', bitsandbytes.__version__, 'torch', torch.__version__)
" 2>&1 | grep -v "kernels-community"
