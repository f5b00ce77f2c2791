#!/usr/bin/env bash
# supermerge merge CONFIG on NPROC ranks under accelerate launch.
# usage: NPROC=2 PORT=29513 launch/accelerate.sh CONFIG.yaml [--resume | --overwrite]
# --multi_gpu is needed on CPU too: with --cpu, accelerate silently starts ONE process; with
# --multi_gpu and no GPU it runs MULTI_CPU over gloo.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
exec accelerate launch --config_file "$here/accelerate_multi.yaml" --num_processes "${NPROC:-2}" \
    --main_process_port "${PORT:-29500}" -m supermerge merge "$@"
