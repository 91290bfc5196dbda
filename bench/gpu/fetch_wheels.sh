#!/usr/bin/env bash
# Run HERE (a machine that reaches PyPI), before a GPU check: downloads into bench/gpu/wheels/ (ignored by git)
# the wheels the bare GPU machine lacks, for its Python (CPython 3.12, x86-64 manylinux: the device README).
# bench/gpu/run.sh installs them there with pip --no-index --no-deps. Every wheel is listed with its size in
# bench/gpu/README.md; together they must stay under the 64 MiB that travels with the working tree.
# Safe to run again.
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p wheels
python=${PYTHON:-python3}
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
# bitsandbytes (its wheel carries the CUDA 13.0 kernels for the machine's torch 2.11+cu130); peft at qbco's
# tested version (qbco.fused_lora patches its LoRA layers; the image's own peft is of unknown version);
# trl 1.13.0, the last with BCOTrainer; datasets (TRL's trainers need it) and the two of its needs the image
# does not have: dill and multiprocess (pinned to what datasets 5.2 accepts).
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d wheels \
    bitsandbytes==0.50.2 peft==0.21.2 trl==1.13.0 datasets==5.2.0 dill==0.4.0 multiprocess==0.70.18
ls -l wheels | awk 'NR > 1 {printf "%-60s %6.1f MiB\n", $9, $5 / 1048576; total += $5} END {printf "%-60s %6.1f MiB\n", "total", total / 1048576}'
