#!/bin/bash
# Multi-node training with the deepspeed launcher: pdsh over ssh starts `vit-pretrain train` on every host
# of a hostfile (`host slots=N`, N = GPUs on that host). Needs passwordless ssh from this host to all hosts
# and the same checkout and python environment at the same path everywhere (a shared file system).
#
#   HOSTFILE=launch/hostfile.example launch/deepspeed.sh configs/pretrain/mae_vit_base_patch16.yaml data.train_urls=...
#
# Ranks started through pdsh inherit only NCCL*/PYTHON*/UCX* variables and what .deepspeed_env lists,
# so this script writes .deepspeed_env (in the working directory, where the launcher reads it) with
# the variables below; add your own with DS_ENV_VARS="VAR1 VAR2".
set -euo pipefail

HOSTFILE=${HOSTFILE:-hostfile}                      # `host slots=N` lines
CONFIG=${CONFIG:-${1:-configs/pretrain/mae_vit_base_patch16.yaml}}
if [ $# -gt 0 ]; then shift; fi                      # the rest: key=value overrides
PYTHON=${PYTHON:-python}
MASTER_ADDR=${MASTER_ADDR:-$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$HOSTFILE")}   # first host
MASTER_PORT=${MASTER_PORT:-29500}
SSH_PORT=${SSH_PORT:-}                               # if sshd listens elsewhere than 22
DEEPSPEED_ENV_FILE=${DEEPSPEED_ENV_FILE:-.deepspeed_env}
DS_ENV_VARS=${DS_ENV_VARS:-}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}   # DeepSpeed's op cache
export VIT_PRETRAIN_RDZV_TIMEOUT=${VIT_PRETRAIN_RDZV_TIMEOUT:-600}

[ -f "$HOSTFILE" ] || { echo "launch/deepspeed.sh: hostfile $HOSTFILE not found; set HOSTFILE (see launch/hostfile.example)" >&2; exit 2; }

# What every rank needs and pdsh would drop. The launcher reads .deepspeed_env from the working directory
# or $HOME, or the path in DS_ENV_FILE, which we point at DEEPSPEED_ENV_FILE.
# PATH too: the ranks must find the same ninja/compiler, or DeepSpeed rebuilds its ops on every launch
vars="PATH PYTHONPATH TORCH_EXTENSIONS_DIR VIT_PRETRAIN_RDZV_TIMEOUT VIT_PRETRAIN_COLLECTIVE_TIMEOUT DS_ACCELERATOR
      OMP_NUM_THREADS GLOO_SOCKET_IFNAME NCCL_SOCKET_IFNAME NCCL_IB_HCA NCCL_DEBUG HF_HOME $DS_ENV_VARS"
: > "$DEEPSPEED_ENV_FILE"
for v in $vars; do
    if [ -n "${!v:-}" ]; then printf '%s=%s\n' "$v" "${!v}" >> "$DEEPSPEED_ENV_FILE"; fi
done
export DS_ENV_FILE=$DEEPSPEED_ENV_FILE

exec "$PYTHON" -m deepspeed.launcher.runner --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" \
    --master_port "$MASTER_PORT" ${SSH_PORT:+--ssh_port "$SSH_PORT"} --no_local_rank \
    --module pretrain train "$CONFIG" "$@"
