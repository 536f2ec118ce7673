#!/bin/bash
# Submit pretraining, then fine-tuning as a dependent job that starts only when pretraining completed
# (after any number of pre-emptions and requeues); the fine-tune job exports the pretraining run first.
#
#   launch/slurm/pretrain_then_finetune.sh configs/pretrain/mae_vit_base_patch16.yaml \
#       configs/finetune/mae_vit_base_patch16_ft.yaml data.train_urls=/data/in1k/train.json \
#       -- data.train_urls=/data/in1k/train.json data.val_urls=/data/in1k/val.json
#
# Overrides before `--` go to pretraining, after it to fine-tuning. SBATCH_ARGS (e.g. "--nodes=4
# --gpus-per-node=8 --ntasks-per-node=8") and FT_SBATCH_ARGS go to sbatch; OUT_DIR and the train.sbatch
# settings pass through the environment.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

[ $# -ge 2 ] || { echo "usage: $0 PRETRAIN_CONFIG FINETUNE_CONFIG [pretrain key=value...] [-- finetune key=value...]" >&2; exit 2; }
PT_CONFIG=$1 FT_CONFIG=$2
shift 2
pt_args=() ft_args=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do pt_args+=("$1"); shift; done
if [ $# -gt 0 ]; then shift; ft_args=("$@"); fi

export OUT_DIR=${OUT_DIR:-runs}
PT_NAME=${PT_NAME:-pretrain-$(date +%Y%m%d-%H%M%S)}   # fixed before submitting: the fine-tune job needs it
FT_NAME=${FT_NAME:-$PT_NAME-ft}
SBATCH_ARGS=${SBATCH_ARGS:-}
FT_SBATCH_ARGS=${FT_SBATCH_ARGS:-$SBATCH_ARGS}

# shellcheck disable=SC2086  # SBATCH_ARGS is a list of options
pt_job=$(RUN_NAME=$PT_NAME sbatch --parsable --job-name="$PT_NAME" $SBATCH_ARGS "$here/train.sbatch" \
         "$PT_CONFIG" "${pt_args[@]}")
pt_job=${pt_job%%;*}
# shellcheck disable=SC2086
ft_job=$(RUN_NAME=$FT_NAME INIT_FROM="$OUT_DIR/$PT_NAME" sbatch --parsable --job-name="$FT_NAME" \
         --dependency="afterok:$pt_job" --kill-on-invalid-dep=yes $FT_SBATCH_ARGS "$here/train.sbatch" \
         "$FT_CONFIG" "${ft_args[@]}")
ft_job=${ft_job%%;*}
echo "pretrain job $pt_job -> $OUT_DIR/$PT_NAME"
echo "finetune job $ft_job (after $pt_job completes) -> $OUT_DIR/$FT_NAME"
