#!/usr/bin/env bash
# Prune-then-distill against a preset student distilled from scratch, at equal distillation steps,
# on ISBI-2012 (issue 23, item 3): the same teacher, the same configs/distill/isbi.yaml, 2 seeds.
#   pruned: student.prune=$PRUNE (magnitude importance; that fraction of the conv channels of every
#           coupled group, of the global-attention heads and of the MLP hidden widths removed from a copy
#           of the fine-tuned teacher by Torch-Pruning), then recovered by distillation
#   preset: student.name=unet_resnet_nano (0.51 M parameters, 0.077 GMACs at 128x128) from random
#           weights, distilled
# PRUNE=0.9 on the default teacher (hybrid_nano, 1.87 M, 0.137 GMACs; its token widths are kept whole)
# leaves 0.76 M parameters and 0.075 GMACs: the same compute as the preset student.
# The deployment report of each run (export.onnx=true, int8) gives GMACs, latency and mIoU per runtime.
#
#   bash benchmarks/prune_vs_preset.sh            # teacher: the label-efficiency ISBI run on all labels
#   TEACHER=runs/finetune/model bash benchmarks/prune_vs_preset.sh
#
# Results: benchmarks/results/prune_vs_preset.md (python benchmarks/prune_vs_preset.py runs/prune).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
TEACHER=${TEACHER:-runs/label_efficiency/isbi/scratch_f1.0_s0/model}
OUT=${OUT:-runs/prune}
PRUNE=${PRUNE:-0.9}
if [ ! -d ../shared/data/isbi2012_em ] || [ ! -d "$TEACHER" ]; then
    echo "skipped: needs ../shared/data/isbi2012_em and the teacher $TEACHER (benchmarks/label_efficiency.py --datasets isbi)"
    exit 0
fi
mkdir -p "$OUT/logs"
for seed in 0 1; do
    for variant in pruned preset; do
        out="$OUT/isbi_${variant}_s$seed"
        [ -f "$out/metrics.json" ] && continue  # resumable
        if [ "$variant" = pruned ]; then
            student=(student.prune=$PRUNE student.prune_importance=magnitude)
        else
            student=(student.name=unet_resnet_nano)
        fi
        python distill/run.py --config configs/distill/isbi.yaml teacher="$TEACHER" "${student[@]}" \
            train.seed=$seed train.output_dir="$out" export.int8=true >"$OUT/logs/${variant}_s$seed.log" 2>&1
        echo "$variant seed $seed: $(python -c "import json; m=json.load(open('$out/metrics.json')); print(round(m['student']['iou'][1], 4), 'membrane IoU')")"
    done
done
python benchmarks/prune_vs_preset.py "$OUT" | tee benchmarks/results/prune_vs_preset.md
