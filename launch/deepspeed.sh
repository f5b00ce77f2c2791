#!/usr/bin/env bash
# supermerge merge CONFIG on NPROC ranks under the deepspeed launcher.
# usage: NPROC=2 PORT=29512 launch/deepspeed.sh CONFIG.yaml [--resume | --overwrite]
# The launcher appends --local_rank=N (supermerge reads the rank from the environment) and
# always uses port 29500 unless told otherwise: give concurrent jobs their own PORT.
# On a CPU machine "--num_gpus" is the number of CPU processes. DeepSpeed compiles its CPU comm
# op on first use (about 45 s): keep TORCH_EXTENSIONS_DIR on a persistent disk.
set -euo pipefail
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/supermerge/torch_extensions}"
exec deepspeed --num_gpus "${NPROC:-2}" --master_port "${PORT:-29500}" --module supermerge merge "$@"
