#!/usr/bin/env bash
# Real-data results (ISBI-2012 EM membranes and CamVid), exactly the commands behind
# benchmarks/results/: self-supervised pretraining, fine-tuning from scratch and from that
# pretraining, and two peer libraries' models trained through the same fine-tuning pipeline.
#
#   bash benchmarks/realdata.sh         # from the repository root: all parts (1-6: ~1 h 50 min on 2 CPU cores; 8-10 add ~1 h 40 min)
#   bash benchmarks/realdata.sh main    # part 1: pretraining + fine-tuning, seed 0 (~32 min)
#   bash benchmarks/realdata.sh seed1   # part 2: the 8 fine-tunes again with train.seed=1 (same encoders)
#   bash benchmarks/realdata.sh unet    # part 3: ISBI with model.decoder=unet, 2 inits x 2 seeds (~6 min)
#   bash benchmarks/realdata.sh mim     # part 4: ISBI pretrained with MIM only (100, 1000 steps), then as part 3 (~12 min)
#   bash benchmarks/realdata.sh capacity  # part 5: ISBI, U-Net decoder with image skips, hybrid_nano/tiny (~10 min)
#   bash benchmarks/realdata.sh longer  # part 6: CamVid with 10x the pretraining (~20 min)
#   bash benchmarks/realdata.sh distill # part 7: teachers, then students alone / +kd / +cwd / +dist / +feature / best, 2 seeds
#   bash benchmarks/realdata.sh scale   # part 8: data.resize settings on CamVid rescaled to 64-1024 px (~10 min)
#   bash benchmarks/realdata.sh default # part 9: the fine-tuning default vs smp U-Net-R18 and SegFormer-B0 at equal CPU seconds (~55 min)
#   bash benchmarks/realdata.sh pretrain_default  # part 10: MIM pretraining for the default, then part 9's fine-tune (~30 min)
#   bash benchmarks/realdata.sh pretrain_segmenter  # part 11: whole-segmenter MIM, default + SegFormer-B0 (~75 min)
#   bash benchmarks/realdata.sh pretrain_dense      # part 12: dense contrastive for the default (~35 min)
#   bash benchmarks/realdata.sh isbi_probes         # part 13: ISBI diagnostics, seed 0 (~30 min)
#
# Needs ../shared/data/{isbi2012_em,camvid} and segmentation-models-pytorch (pip install -e ".[bench]").
# Budgets (hybrid_nano, 100 pretraining steps of 16 images, 200 fine-tuning steps of 8 crops of
# 128x128, bf16 autocast) live in the configs; nothing is overridden here except output folders.
# `peers_seg.py --models ours` runs finetune.run.main(cfg), i.e. what
# `python finetune/run.py --config <same yaml>` runs, under the same timer as the peers.
set -euo pipefail
cd "$(dirname "$0")/.."

# One intra-op thread per process: on this 2-core machine shared with other jobs, PyTorch's
# default (2 threads) made every train step 5-9x slower (OpenMP threads spinning on busy cores).
export OMP_NUM_THREADS=1

PART=${1:-all}
RES=benchmarks/results
LOG=runs/realdata/logs
mkdir -p "$RES" "$LOG"

# timed NAME CMD...: run CMD with its log in $LOG/NAME.log; wall time in $RES/wall_NAME.json
timed() {
    local name=$1
    shift
    local start end
    start=$(date +%s)
    "$@" >"$LOG/$name.log" 2>&1
    end=$(date +%s)
    printf '{"run": "%s", "command": "%s", "wall_s": %d, "omp_num_threads": %d}\n' \
        "$name" "$*" $((end - start)) "$OMP_NUM_THREADS" >"$RES/wall_$name.json"
    echo "$name: $((end - start)) s"
}

# last logged value of every training scalar of a pretraining run (TensorBoard events)
pretrain_summary() {
    python - "$1" "$2" <<'EOF'
import glob, json, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
run, out = sys.argv[1], sys.argv[2]
summary = json.load(open(out))
for path in glob.glob(f"{run}/logs/**/events.out.tfevents.*", recursive=True):
    ea = EventAccumulator(path)
    ea.Reload()
    for tag in ea.Tags()["scalars"]:
        events = ea.Scalars(tag)
        summary.setdefault("first", {})[tag] = round(events[0].value, 5)
        summary.setdefault("last", {})[tag] = round(events[-1].value, 5)
        summary["steps_logged"] = events[-1].step
json.dump(summary, open(out, "w"), indent=2)
EOF
}

if [ "$PART" = all ] || [ "$PART" = main ]; then
    # fresh runs: train.resume=auto would otherwise continue from old checkpoints
    rm -rf runs/realdata/isbi_* runs/realdata/camvid_* runs/isbi_pretrain runs/camvid_pretrain
    for ds in isbi camvid; do
        pre=$([ "$ds" = isbi ] && echo isbi_em || echo camvid)
        # 1. self-supervised pretraining (contrastive + MIM) on unlabelled images
        timed "${ds}_pretrain" python pretrain/run.py --config "configs/pretrain/$pre.yaml"
        pretrain_summary "runs/${ds}_pretrain" "$RES/wall_${ds}_pretrain.json"
        # 2. fine-tune from that pretraining
        timed "${ds}_from_pretrain" python benchmarks/peers_seg.py --config "configs/finetune/${ds}_from_pretrain.yaml" \
            --models ours --output-root runs/realdata --json "$RES/${ds}_from_pretrain.json"
        # 2'+3. from scratch: ours and the two peers, same config
        timed "${ds}_scratch" python benchmarks/peers_seg.py --config "configs/finetune/${ds}_scratch.yaml" \
            --models ours smp_unet_resnet18 hf_segformer_b0 --output-root runs/realdata --json "$RES/${ds}_scratch.json"
    done
fi

# Part 2: a second fine-tuning seed (init, data order, augmentations) of every fine-tune, from the
# same pretrained encoders, to see how much of each difference is seed noise.
if [ "$PART" = all ] || [ "$PART" = seed1 ]; then
    rm -rf runs/realdata/seed1
    for ds in isbi camvid; do
        timed "${ds}_from_pretrain_seed1" python benchmarks/peers_seg.py \
            --config "configs/finetune/${ds}_from_pretrain.yaml" --models ours --output-root runs/realdata/seed1 \
            --json "$RES/${ds}_from_pretrain_seed1.json" train.seed=1
        timed "${ds}_scratch_seed1" python benchmarks/peers_seg.py --config "configs/finetune/${ds}_scratch.yaml" \
            --models ours smp_unet_resnet18 hf_segformer_b0 --output-root runs/realdata/seed1 \
            --json "$RES/${ds}_scratch_seed1.json" train.seed=1
    done
fi

# Part 3: ISBI again with the U-Net decoder on the same encoder (full-resolution skips for 1-3 px
# membranes), scratch and from the part-1 ISBI encoder, both seeds.
if [ "$PART" = all ] || [ "$PART" = unet ]; then
    [ -f runs/isbi_pretrain/encoder/model.safetensors ] || {
        echo "part unet needs runs/isbi_pretrain/encoder: run part main first" >&2
        exit 1
    }
    rm -rf runs/realdata/unet
    for seed in 0 1; do
        for init in scratch from_pretrain; do
            timed "isbi_${init}_unet_seed$seed" python benchmarks/peers_seg.py \
                --config "configs/finetune/isbi_${init}.yaml" --models ours --output-root "runs/realdata/unet/seed$seed" \
                --json "$RES/isbi_${init}_unet_seed$seed.json" model.decoder=unet train.seed=$seed
        done
    done
fi

# Part 4: on ISBI the contrastive term stays at chance (see README); pretrain with MIM alone for
# the same 100 steps and for 1000, then fine-tune from each with the U-Net decoder, both seeds.
if [ "$PART" = all ] || [ "$PART" = mim ]; then
    rm -rf runs/realdata/mim
    for steps in 100 1000; do
        rm -rf "runs/isbi_pretrain_mim$steps"
        timed "isbi_pretrain_mim$steps" python pretrain/run.py --config configs/pretrain/isbi_em.yaml \
            objective.name=mim train.max_steps=$steps train.ckpt_every=$steps \
            train.output_dir="runs/isbi_pretrain_mim$steps"
        pretrain_summary "runs/isbi_pretrain_mim$steps" "$RES/wall_isbi_pretrain_mim$steps.json"
        for seed in 0 1; do
            timed "isbi_from_pretrain_mim${steps}_unet_seed$seed" python benchmarks/peers_seg.py \
                --config configs/finetune/isbi_from_pretrain.yaml --models ours \
                --output-root "runs/realdata/mim$steps/seed$seed" \
                --json "$RES/isbi_from_pretrain_mim${steps}_unet_seed$seed.json" \
                model.init="runs/isbi_pretrain_mim$steps/encoder" model.decoder=unet train.seed=$seed
        done
    done
fi

# Part 5: what is left of the ISBI gap to smp's U-Net: full-resolution image skips in the U-Net
# decoder (strides 1 and 2, below the encoder's stride 4), then a 2.7x larger encoder, from scratch.
if [ "$PART" = all ] || [ "$PART" = capacity ]; then
    rm -rf runs/realdata/capacity
    for model in hybrid_nano hybrid_tiny; do
        for seed in 0 1; do
            timed "isbi_scratch_${model}_unet_imgskip_seed$seed" python benchmarks/peers_seg.py \
                --config configs/finetune/isbi_scratch.yaml --models ours \
                --output-root "runs/realdata/capacity/$model/seed$seed" \
                --json "$RES/isbi_scratch_${model}_unet_imgskip_seed$seed.json" \
                model.name=$model model.decoder=unet "model.decoder_kwargs={image_skip_channels: [16, 32]}" \
                train.seed=$seed
        done
    done
fi

# Part 6: does more pretraining pay on CamVid, where the contrastive term does learn? Ten times
# the pretraining of part 1 (1000 steps), then the part-1 fine-tune from it, both seeds.
if [ "$PART" = all ] || [ "$PART" = longer ]; then
    rm -rf runs/camvid_pretrain_1000 runs/realdata/longer
    timed camvid_pretrain_1000 python pretrain/run.py --config configs/pretrain/camvid.yaml \
        train.max_steps=1000 train.ckpt_every=1000 train.output_dir=runs/camvid_pretrain_1000
    pretrain_summary runs/camvid_pretrain_1000 "$RES/wall_camvid_pretrain_1000.json"
    for seed in 0 1; do
        timed "camvid_from_pretrain_1000_seed$seed" python benchmarks/peers_seg.py \
            --config configs/finetune/camvid_from_pretrain.yaml --models ours \
            --output-root "runs/realdata/longer/seed$seed" --json "$RES/camvid_from_pretrain_1000_seed$seed.json" \
            model.init=runs/camvid_pretrain_1000/encoder train.seed=$seed
    done
fi

# Part 7: distillation. A teacher per dataset (our strongest ISBI model: hybrid_tiny + U-Net decoder
# with image skips, 400 steps) and one student with 13-15x fewer GMACs (unet_resnet_nano), every
# student trained with the same budget as the 200-step fine-tunes above: alone (task loss only),
# + each distillation term, and the best combination; 2 seeds each. The student-alone rows are
# finetune/run.py's training through distill/run.py (task_weight 1, no term), so nothing else differs.
DISTILL_VARIANTS=(
    "alone|kd.task_weight=1.0|kd.weights={}"
    "kd|kd.weights={kd: 0.3}"
    "cwd|kd.weights={cwd: 0.3}"
    "dist|kd.weights={dist: 0.5}"
    "feature|kd.weights={feature: 0.5}"
    "best|kd.weights={kd: 0.3, cwd: 0.3}"
)
# "best" = the two terms that beat the student alone on ISBI with both seeds (kd, cwd), chosen from
# the single-term rows on the same evaluation split (so it is an optimistic pick); CamVid reuses it
# term weights: each term's value at the first steps on ISBI (task 1.3, kd 1.7 at T=3, cwd 3.2 at
# tau=4, dist 1.7, feature 2.0) times its weight is about the weighted task loss (0.7 x 1.3)
if [ "$PART" = all ] || [ "$PART" = distill ] || [ "$PART" = distill_teachers ]; then
    for ds in isbi camvid; do
        rm -rf "runs/realdata/distill/${ds}_teacher"
        timed "distill_${ds}_teacher" python finetune/run.py --config "configs/finetune/${ds}_scratch.yaml" \
            model.name=hybrid_tiny model.decoder=unet "model.decoder_kwargs={image_skip_channels: [16, 32]}" \
            train.max_steps=400 train.ckpt_every=400 train.output_dir="runs/realdata/distill/${ds}_teacher"
    done
fi
if [ "$PART" = all ] || [ "$PART" = distill ] || [ "$PART" = distill_students ]; then
    # DISTILL_DATASETS / DISTILL_SEEDS / DISTILL_ONLY (variant names) narrow the loops when set
    for ds in ${DISTILL_DATASETS:-isbi camvid}; do
        for seed in ${DISTILL_SEEDS:-0 1}; do
            for variant in "${DISTILL_VARIANTS[@]}"; do
                IFS='|' read -r name o1 o2 <<<"$variant"
                [ -z "${DISTILL_ONLY:-}" ] || [[ " $DISTILL_ONLY " == *" $name "* ]] || continue
                out="runs/realdata/distill/$ds/$name/seed$seed"
                rm -rf "$out"
                # ONNX fp32 + int8 and the deployment report for the best student of seed 0 only
                exp=$([ "$name" = best ] && [ "$seed" = 0 ] && echo true || echo false)
                timed "distill_${ds}_${name}_seed$seed" python distill/run.py --config "configs/distill/$ds.yaml" \
                    teacher="runs/realdata/distill/${ds}_teacher/model" train.output_dir="$out" train.seed=$seed \
                    export.onnx=$exp export.int8=$exp export.report=$exp "$o1" ${o2:+"$o2"}
            done
        done
    done
    python benchmarks/distill.py --summarize "$RES" | tee "$RES/distill_summary.md"
fi

# Part 8: scale handling for a folder of photos of widely varying size. CamVid with every image
# rescaled to a random short side in 64-1024 px (benchmarks/make_varsize.py; 367 train, 100 test
# images), the camvid_scratch fine-tune with data.resize left at auto (-> [128, 512]), native sizes,
# and three fixed scales; seed 0, hybrid_nano (the comparison is between scales, not models), then
# auto and native with the fine-tuning default model.
if [ "$PART" = all ] || [ "$PART" = scale ]; then
    rm -rf runs/realdata/camvid_varsize runs/realdata/varsize_*  # fresh runs, not resumed ones
    python benchmarks/make_varsize.py ../shared/data/camvid runs/realdata/camvid_varsize
    for resize in auto native "[96, 384]" "[192, 768]" "[256, 1024]"; do
        tag=$(echo "$resize" | tr -d '[] ' | cut -d, -f1)
        timed "varsize_camvid_$tag" python benchmarks/peers_seg.py --config configs/finetune/camvid_scratch.yaml \
            data.source=runs/realdata/camvid_varsize "data.resize=$resize" \
            --output-root runs/realdata/varsize_$tag --json "$RES/varsize_camvid_$tag.json" --models ours
    done
    for resize in auto native; do  # the same with the fine-tuning default model (model.name empty)
        timed "varsize_camvid_default_$resize" python benchmarks/peers_seg.py --config configs/finetune/camvid_scratch.yaml \
            data.source=runs/realdata/camvid_varsize "data.resize=$resize" model.name= \
            --output-root runs/realdata/varsize_default_$resize --json "$RES/varsize_camvid_default_$resize.json" --models ours
    done
    python benchmarks/peers_seg.py --summarize "$RES"/varsize_camvid_*.json | tee "$RES/varsize_summary.md"
fi

# Part 9: the fine-tuning default (sequential_unet_tiny: ResNet stages + global attention at
# stride 32 + U-Net decoder) against smp's U-Net-R18 at equal CPU seconds, same pipeline: the
# U-Net gets the configs' 200 steps, ours and transformers' SegFormer-B0 the steps that take about
# the same CPU time (420 and 350; the "train CPU (s)" column shows the match), 2 seeds each.
if [ "$PART" = all ] || [ "$PART" = default ]; then
    rm -rf runs/realdata/default_seed*
    for ds in isbi camvid; do
        for seed in 0 1; do
            timed "default_${ds}_smp_seed$seed" python benchmarks/peers_seg.py --config "configs/finetune/${ds}_scratch.yaml" \
                train.seed=$seed --output-root runs/realdata/default_seed$seed \
                --json "$RES/default_${ds}_smp_seed$seed.json" --models smp_unet_resnet18
            timed "default_${ds}_ours_seed$seed" python benchmarks/peers_seg.py --config "configs/finetune/${ds}_scratch.yaml" \
                model.name=sequential_unet_tiny train.max_steps=420 train.seed=$seed --output-root runs/realdata/default_seed$seed \
                --json "$RES/default_${ds}_ours_seed$seed.json" --models ours
            timed "default_${ds}_segformer_seed$seed" python benchmarks/peers_seg.py --config "configs/finetune/${ds}_scratch.yaml" \
                train.max_steps=350 train.seed=$seed --output-root runs/realdata/default_seed$seed \
                --json "$RES/default_${ds}_segformer_seed$seed.json" --models hf_segformer_b0
        done
    done
    python benchmarks/peers_seg.py --summarize "$RES"/default_*.json | tee "$RES/default_summary.md"
fi

# Part 10: pretraining for the fine-tuning default. MIM with MAE's normalised-pixel targets on the
# dataset's unlabelled images (ISBI: the 30 unlabelled test slices; CamVid: the training frames),
# sequential_tiny, 300 steps of 16 images (less CPU time than the 420-step fine-tune), then the
# part-9 fine-tune from it (model.name empty: the encoder keeps the default's U-Net decoder).
if [ "$PART" = all ] || [ "$PART" = pretrain_default ]; then
    for ds in isbi camvid; do
        pre=$([ "$ds" = isbi ] && echo isbi_em || echo camvid)
        rm -rf "runs/realdata/${ds}_pretrain_default" runs/realdata/default_pretrained_*
        timed "${ds}_pretrain_default" python pretrain/run.py --config "configs/pretrain/$pre.yaml" \
            model.name=sequential_tiny objective.name=mim objective.norm_pix_loss=true \
            train.max_steps=300 train.ckpt_every=300 train.output_dir="runs/realdata/${ds}_pretrain_default"
        for seed in 0 1; do
            timed "default_${ds}_pretrained_seed$seed" python benchmarks/peers_seg.py \
                --config "configs/finetune/${ds}_scratch.yaml" model.name= \
                model.init="runs/realdata/${ds}_pretrain_default/encoder" train.max_steps=420 train.seed=$seed \
                --output-root runs/realdata/default_pretrained_seed$seed \
                --json "$RES/default_${ds}_pretrained_seed$seed.json" --models ours
        done
    done
    python benchmarks/peers_seg.py --summarize "$RES"/default_*.json | tee "$RES/default_summary.md"
fi

# Part 11: pretraining the whole segmenter (objective.mim_decoder=segmenter: MIM through the model's own
# decoder, fine-tuned from <out>/segmenter with only its output layer fresh), MAE norm-pix targets,
# 250 steps of 16 crops (less CPU than the fine-tune), for the default and for SegFormer-B0 (ours,
# 560 fine-tuning steps: about the default's CPU time), against scratch at the same fine-tuning steps.
if [ "$PART" = all ] || [ "$PART" = pretrain_segmenter ]; then
    rm -rf runs/realdata/segpre_*
    for ds in isbi camvid; do
        pre=$([ "$ds" = isbi ] && echo isbi_em || echo camvid)
        for model in sequential_unet_tiny segformer_b0; do
            steps=$([ "$model" = segformer_b0 ] && echo 560 || echo 420)
            out="runs/realdata/segpre_${ds}_${model}"
            timed "segpre_${ds}_${model}_pretrain" python pretrain/run.py --config "configs/pretrain/$pre.yaml" \
                model.name=$model objective.name=mim objective.mim_decoder=segmenter objective.norm_pix_loss=true \
                train.max_steps=250 train.ckpt_every=250 train.output_dir="$out/pretrain"
            for seed in 0 1; do
                if [ "$model" = segformer_b0 ]; then  # part 9 has the default's scratch rows
                    timed "segpre_${ds}_${model}_scratch_seed$seed" python benchmarks/peers_seg.py \
                        --config "configs/finetune/${ds}_scratch.yaml" model.name=$model train.max_steps=$steps \
                        train.seed=$seed --output-root "$out/scratch_seed$seed" \
                        --json "$RES/segpre_${ds}_${model}_scratch_seed$seed.json" --models ours
                fi
                timed "segpre_${ds}_${model}_pretrained_seed$seed" python benchmarks/peers_seg.py \
                    --config "configs/finetune/${ds}_scratch.yaml" model.name= model.init="$out/pretrain/segmenter" \
                    train.max_steps=$steps train.seed=$seed --output-root "$out/pretrained_seed$seed" \
                    --json "$RES/segpre_${ds}_${model}_pretrained_seed$seed.json" --models ours
            done
        done
    done
    python benchmarks/peers_seg.py --summarize "$RES"/segpre_*.json | tee "$RES/segpre_summary.md"
fi

# Part 12: dense (point-level) contrastive pretraining of the default's encoder, 200 steps of 16
# images (two views each), then part 9's fine-tune from the encoder.
if [ "$PART" = all ] || [ "$PART" = pretrain_dense ]; then
    for ds in isbi camvid; do
        pre=$([ "$ds" = isbi ] && echo isbi_em || echo camvid)
        out="runs/realdata/densepre_${ds}"
        rm -rf "$out"
        timed "densepre_${ds}_pretrain" python pretrain/run.py --config "configs/pretrain/$pre.yaml" \
            model.name=sequential_tiny objective.name=dense_contrastive \
            train.max_steps=200 train.ckpt_every=200 train.output_dir="$out/pretrain"
        for seed in 0 1; do
            timed "densepre_${ds}_seed$seed" python benchmarks/peers_seg.py \
                --config "configs/finetune/${ds}_scratch.yaml" model.name=sequential_unet_tiny \
                model.init="$out/pretrain/encoder" train.max_steps=420 train.seed=$seed \
                --output-root "$out/ft_seed$seed" --json "$RES/densepre_${ds}_seed$seed.json" --models ours
        done
    done
    python benchmarks/peers_seg.py --summarize "$RES"/densepre_*.json | tee "$RES/densepre_summary.md"
fi

# Part 13: why nothing pays on ISBI (seed 0 each): twice the fine-tuning steps from scratch; MIM
# through the segmenter with 8-px masks and plain L1 targets (its loss falls further than norm-pix's);
# the part-11 segmenter init fine-tuned with layer-wise LR decay 0.8.
if [ "$PART" = all ] || [ "$PART" = isbi_probes ]; then
    out=runs/realdata/isbi_probes
    rm -rf "$out"
    timed isbi_probe_scratch840 python benchmarks/peers_seg.py --config configs/finetune/isbi_scratch.yaml \
        model.name=sequential_unet_tiny train.max_steps=840 --output-root "$out/scratch840" \
        --json "$RES/segprobe_isbi_sequential_unet_tiny_scratch840_seed0.json" --models ours
    timed isbi_probe_mask8_pretrain python pretrain/run.py --config configs/pretrain/isbi_em.yaml \
        model.name=sequential_unet_tiny objective.name=mim objective.mim_decoder=segmenter \
        objective.mask_patch_size=8 train.max_steps=250 train.ckpt_every=250 train.output_dir="$out/mask8"
    timed isbi_probe_mask8 python benchmarks/peers_seg.py --config configs/finetune/isbi_scratch.yaml \
        model.name= model.init="$out/mask8/segmenter" train.max_steps=420 --output-root "$out/mask8_ft" \
        --json "$RES/segprobe_isbi_sequential_unet_tiny_mask8_l1_seed0.json" --models ours
    timed isbi_probe_layer_decay python benchmarks/peers_seg.py --config configs/finetune/isbi_scratch.yaml \
        model.name= model.init=runs/realdata/segpre_isbi_sequential_unet_tiny/pretrain/segmenter \
        train.max_steps=420 optim.layer_decay=0.8 --output-root "$out/layer_decay" \
        --json "$RES/segprobe_isbi_sequential_unet_tiny_layer_decay08_seed0.json" --models ours
    python benchmarks/peers_seg.py --summarize "$RES"/segprobe_*.json | tee "$RES/segprobe_summary.md"
fi

shopt -s nullglob
case "$PART" in distill*) exit 0 ;; esac  # the distillation parts print their own table
case "$PART" in scale | default | pretrain_default | pretrain_segmenter | pretrain_dense | isbi_probes) exit 0 ;; esac  # so do these
python benchmarks/peers_seg.py --summarize "$RES"/isbi_*.json "$RES"/camvid_*.json | tee "$RES/summary.md"
