#!/bin/bash
# One node, or static multi-node, with torchrun: NPROC_PER_NODE workers of `vit-pretrain train` per node.
#
#   launch/torchrun.sh CONFIG key=value...                                   # one node, all its GPUs
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node1 launch/torchrun.sh CONFIG ...     # on node1
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node1 launch/torchrun.sh CONFIG ...     # on node2
set -euo pipefail

CONFIG=${CONFIG:-${1:-configs/pretrain/mae_vit_base_patch16.yaml}}
if [ $# -gt 0 ]; then shift; fi                      # the rest: key=value overrides
PYTHON=${PYTHON:-python}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
NPROC_PER_NODE=${NPROC_PER_NODE:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 1)')}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}               # node rank 0's address, reachable from every node
MASTER_PORT=${MASTER_PORT:-29500}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export VIT_PRETRAIN_RDZV_TIMEOUT=${VIT_PRETRAIN_RDZV_TIMEOUT:-600}

exec "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --node_rank="$NODE_RANK" \
    --nproc_per_node="$NPROC_PER_NODE" --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
    -m pretrain train "$CONFIG" "$@"
