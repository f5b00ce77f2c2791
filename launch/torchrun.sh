#!/usr/bin/env bash
# supermerge merge CONFIG on NPROC ranks of this machine under torchrun (gloo on CPU, NCCL on GPU).
# usage: NPROC=4 launch/torchrun.sh CONFIG.yaml [--resume | --overwrite]
# --standalone picks a free rendezvous port, so several jobs can share a machine.
set -euo pipefail
exec torchrun --standalone --nproc_per_node="${NPROC:-2}" -m supermerge merge "$@"
