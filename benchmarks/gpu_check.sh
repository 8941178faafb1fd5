#!/usr/bin/env bash
# GPU readiness check: every CUDA path of the pipeline in one command (under 8 minutes on one GPU,
# no downloads). Whoever gets a GPU runs it and commits the log it writes.
#
#   bash benchmarks/gpu_check.sh                 # CUDA; log: benchmarks/results/gpu_check_<date>.txt
#   bash benchmarks/gpu_check.sh --dry-run       # the same commands at tiny size on CPU (~1 minute)
#   bash benchmarks/gpu_check.sh --log FILE --keep   # another log path; keep the work directory
#
# Sections:
#   1. environment      versions, the GPU, onnxruntime's providers
#   2. pretrain         pretrain/run.py in bf16 and in fp16 (loss scaling), TensorBoard, DataLoader
#                       workers, the probe, image logging
#   3. finetune         finetune/run.py from the pretrained encoder, bf16 and fp16, EMA on, evaluation
#                       mid-run (EMA exists only here: pretraining and distillation have no EMA option)
#   4. resume           a fine-tune stopped by SIGTERM to its process group (as a scheduler does) must
#                       exit 143 with a checkpoint; a rerun with a larger train.max_steps must resume
#                       from that checkpoint and finish
#   5. distill          distill/run.py from each fine-tuned teacher, bf16 and fp16, with its ONNX export
#                       and deployment report
#   6. onnxruntime      the exported student on onnxruntime's CUDA provider (when installed; else it
#                       says so) and CPU provider, against PyTorch
#   7. peers            training-step throughput and MFU: ours vs transformers SegFormer-B0 and SimMIM
#                       (benchmarks/gpu_peers.py)
#   8. fsdp             finetune/run.py under `accelerate launch --use_fsdp` on one GPU, FSDP1 and FSDP2
#                       (skipped by --dry-run: Accelerate on CPU silently runs plain DDP for --use_fsdp)
#   9. summary          the stages' last throughput lines
# Every command that fails fails the script (the line and command are printed); the risky FSDP
# section runs last so a failure there still leaves every other figure in the log.
# Environment: PYTHON (default python).
set -Eeuo pipefail

usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; }

DRY_RUN=0
KEEP=0
LOG=""
while (($#)); do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --keep) KEEP=1 ;;
        --log)
            LOG=${2:?--log needs a file}
            shift
            ;;
        -h | --help)
            usage
            exit 0
            ;;
        *)
            echo "gpu_check: unknown option $1 (--dry-run, --log FILE, --keep)" >&2
            exit 2
            ;;
    esac
    shift
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python}
STAMP=$(date +%Y%m%d_%H%M%S)
if [[ -z $LOG ]]; then
    if ((DRY_RUN)); then
        LOG=${TMPDIR:-/tmp}/gpu_check_${STAMP}_dryrun.txt
    else
        LOG=$ROOT/benchmarks/results/gpu_check_${STAMP}.txt
    fi
fi
mkdir -p "$(dirname "$LOG")"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
START=$SECONDS

exec > >(tee "$LOG") 2>&1
finish() {
    local rc=$?
    if ((rc == 0 && !KEEP)); then
        rm -rf "$WORK"
    else
        echo "gpu_check: work directory kept: $WORK"
    fi
    ((rc == 0)) || echo "gpu_check: FAILED (exit $rc) after $((SECONDS - START)) s; log: $LOG"
}
trap finish EXIT
trap 'echo "gpu_check: command failed (exit $?) at line $LINENO: $BASH_COMMAND"' ERR

fail() {
    echo "gpu_check: $*"
    exit 1
}
section() {
    echo
    echo "== $* == ($((SECONDS - START)) s)"
}

# no downloads: every model is built from a config, every dataset is the built-in synthetic one
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
cd "$WORK" # relative defaults (runs/...) land here, never in the repository

if ((DRY_RUN)); then
    export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} # tiny sizes gain nothing from threads
    STEPS=3 RESUME_STEPS=2 BATCH=2 SIZE=64 WORKERS=1 SAMPLES=8 VAL=2 LOG_EVERY=1
    PROBE=(probe.train_images=2 probe.val_images=2 probe.at_start=false)
    EXPORT=(export.report_runs=1 export.report_images=1)
    PEERS=(--tiny --steps 1 --warmup 1 --seg-batch 2 --seg-size 64 --mim-batch 2 --mim-size 64)
    PEERS+=(--classes 4 --matmul-side 256)
else
    STEPS=40 RESUME_STEPS=20 BATCH=32 SIZE=128 WORKERS=4 SAMPLES=2048 VAL=32 LOG_EVERY=10
    PROBE=(probe.train_images=64 probe.val_images=32)
    EXPORT=(export.report_runs=3 export.report_images=8)
    PEERS=()
fi
# every stage run: TensorBoard on, DataLoader workers on, the tqdm bar asked for (plain lines in a log),
# a checkpoint half-way and at the end
COMMON=(
    "train.max_steps=$STEPS" "train.batch_size=$BATCH" "data.image_size=[$SIZE,$SIZE]"
    "data.num_workers=$WORKERS" "data.synthetic_samples=$SAMPLES" "train.log_every=$LOG_EVERY"
    "train.trackers=[tensorboard]" train.progress_bar=true "train.ckpt_every=$((STEPS / 2 > 0 ? STEPS / 2 : 1))"
)
SUMMARY=()

# ------------------------------------------------------------------------------------------------
section "1. environment"
echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC'); host: ${HOSTNAME:-?}; git: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
echo "mode: $( ((DRY_RUN)) && echo 'dry run (CPU, tiny sizes)' || echo 'GPU')"
if ((!DRY_RUN)) && command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv || echo "(nvidia-smi failed)"
fi
"$PY" - "$DRY_RUN" <<'EOF'
import importlib.metadata as md
import sys

import torch

dry = sys.argv[1] == "1"
for pkg in ("torch", "accelerate", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorboard"):
    try:
        print(f"{pkg} {md.version(pkg)}")
    except md.PackageNotFoundError:
        print(f"{pkg}: not installed")
try:
    import onnxruntime

    print("onnxruntime providers:", ", ".join(onnxruntime.get_available_providers()))
except ImportError:
    pass
print(f"python {sys.version.split()[0]}; torch CUDA {torch.version.cuda}; cuDNN {torch.backends.cudnn.version()}")
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    print(
        f"GPU 0: {props.name}, {props.total_memory / 2**30:.1f} GiB, compute capability "
        f"{props.major}.{props.minor}, bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}"
    )
elif not dry:
    sys.exit("gpu_check: no CUDA device visible to torch; on a CPU machine run it with --dry-run")
else:
    print(f"CPU threads: {torch.get_num_threads()}")
EOF
if ((DRY_RUN)); then
    PRECISIONS=(no)
elif "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_bf16_supported() else 1)"; then
    PRECISIONS=(bf16 fp16)
else
    echo "this GPU has no bf16: fp16 (with loss scaling) only"
    PRECISIONS=(fp16)
fi
((DRY_RUN)) && PEERS+=(--dtypes no) || PEERS+=(--dtypes "${PRECISIONS[@]}")
echo "precisions: ${PRECISIONS[*]}; steps $STEPS, batch $BATCH, ${SIZE}x$SIZE px, $WORKERS DataLoader workers"

# A stage run: its output goes to the log and to $WORK/<name>.log; then its TensorBoard events and
# its last throughput line are checked.
stage() {
    local name=$1 script=$2 out=$WORK/$1
    shift 2
    echo "+ $script train.output_dir=$out $*"
    "$PY" "$ROOT/$script" "train.output_dir=$out" "$@" 2>&1 | tee "$WORK/$name.log"
    tensorboard_written "$out"
    record_rate "$name"
}
tensorboard_written() {
    [[ -n $(find "$1/logs" -name 'events.out.tfevents.*' -size +0 -print -quit 2>/dev/null) ]] ||
        { echo "gpu_check: no TensorBoard event file under $1/logs" && return 1; }
}
record_rate() {
    local line
    line=$(grep -E " step [0-9]+/[0-9]+ .*img/s" "$WORK/$1.log" | tail -n 1) ||
        { echo "gpu_check: $1 printed no 'step N/M ... img/s' line" && return 1; }
    SUMMARY+=("$(printf '%-26s %s' "$1" "$line")")
}

# ------------------------------------------------------------------------------------------------
section "2. pretrain (${PRECISIONS[*]})"
for mp in "${PRECISIONS[@]}"; do
    # the probe at the end, MIM image grids logged half-way
    stage "pretrain_$mp" pretrain/run.py "${COMMON[@]}" "train.mixed_precision=$mp" "${PROBE[@]}" \
        "train.eval_every=$STEPS" "train.log_images_every=$((STEPS / 2 > 0 ? STEPS / 2 : 1))"
    [[ -f $WORK/pretrain_$mp/encoder/model.safetensors ]] || fail "pretrain ($mp) wrote no encoder"
done

# ------------------------------------------------------------------------------------------------
section "3. finetune (${PRECISIONS[*]}, EMA on)"
FINETUNE=("${COMMON[@]}" model.ema_decay=0.99 "data.synthetic_val_samples=$VAL" "eval.batch_size=$BATCH")
for mp in "${PRECISIONS[@]}"; do
    # evaluation (with the EMA weights) half-way and at the end
    stage "finetune_$mp" finetune/run.py "${FINETUNE[@]}" "train.mixed_precision=$mp" \
        "model.init=$WORK/pretrain_$mp/encoder" "train.eval_every=$((STEPS / 2 > 0 ? STEPS / 2 : 1))"
    [[ -f $WORK/finetune_$mp/model/model.safetensors ]] || fail "finetune ($mp) wrote no model"
    grep -q "mIoU=" "$WORK/finetune_$mp.log" || fail "finetune ($mp) printed no metrics"
done

# ------------------------------------------------------------------------------------------------
mp=${PRECISIONS[0]}
section "4. resume ($mp): SIGTERM to the process group mid-run, then a rerun with a larger train.max_steps"
out=$WORK/resume
RESUME=(model.init= model.name=unet_resnet_nano) # the smallest preset: this section checks the mechanics
first=$WORK/resume_interrupted.log
launcher=()
command -v setsid >/dev/null && launcher=(setsid) # its own process group, signalled as a whole
"${launcher[@]}" "$PY" "$ROOT/finetune/run.py" "train.output_dir=$out" "${FINETUNE[@]}" \
    "train.mixed_precision=$mp" "${RESUME[@]}" train.max_steps=100000 train.log_every=1 >"$first" 2>&1 &
pid=$!
for ((i = 0; i < 240; i++)); do # at most 2 minutes
    grep -Eq "finetune step [0-9]+/100000" "$first" && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
done
if ((${#launcher[@]})); then kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"; else kill -TERM "$pid"; fi
rc=0
wait "$pid" || rc=$?
cat "$first"
((rc == 143)) || fail "the interrupted run exited $rc, expected 143 (128 + SIGTERM)"
last=$(find "$out/checkpoints" -maxdepth 1 -name 'step_*' | sort | tail -n 1)
[[ -n $last ]] || fail "the interrupted run left no checkpoint in $out/checkpoints"
saved=$((10#${last##*step_}))
total=$((saved + RESUME_STEPS))
echo "interrupted at step $saved (exit $rc); resuming to train.max_steps=$total"
stage resume finetune/run.py "${FINETUNE[@]}" "train.mixed_precision=$mp" "${RESUME[@]}" "train.max_steps=$total"
grep -q "resumed from .* at step $saved" "$WORK/resume.log" || fail "the rerun did not resume from step $saved"
[[ -f $out/checkpoints/$(printf 'step_%08d' "$total")/trainer_state.json ]] ||
    fail "no final checkpoint at step $total"

# ------------------------------------------------------------------------------------------------
section "5. distill (${PRECISIONS[*]}) with ONNX export"
for mp in "${PRECISIONS[@]}"; do
    stage "distill_$mp" distill/run.py "teacher=$WORK/finetune_$mp/model" "${COMMON[@]}" \
        "train.mixed_precision=$mp" "data.synthetic_val_samples=$VAL" "eval.batch_size=$BATCH" \
        export.onnx=true "${EXPORT[@]}"
    [[ -f $WORK/distill_$mp/student.onnx ]] || fail "distill ($mp) exported no student.onnx"
done

# ------------------------------------------------------------------------------------------------
section "6. onnxruntime: the exported student on the CUDA provider (when installed) and the CPU provider"
mp=${PRECISIONS[0]}
"$PY" "$ROOT/benchmarks/gpu_peers.py" onnx --onnx "$WORK/distill_$mp/student.onnx" \
    --model "$WORK/distill_$mp/student" --size "$SIZE" "$SIZE" --batch 2

# ------------------------------------------------------------------------------------------------
section "7. peers: training-step throughput and MFU vs transformers SegFormer-B0 and SimMIM"
"$PY" "$ROOT/benchmarks/gpu_peers.py" steps "${PEERS[@]}"

# ------------------------------------------------------------------------------------------------
fsdp_finetune() { # called as `fsdp_finetune V || ...`, where set -e is off: every step checks itself
    local version=$1 mp=${PRECISIONS[0]} out=$WORK/fsdp$1
    echo "+ accelerate launch --use_fsdp --fsdp_version $version --num_processes 1 finetune/run.py"
    "$PY" -m accelerate.commands.launch --use_fsdp --fsdp_version "$version" --num_processes 1 \
        --num_machines 1 --mixed_precision "$mp" --dynamo_backend no --main_process_port 0 \
        "$ROOT/finetune/run.py" "train.output_dir=$out" "${FINETUNE[@]}" "train.mixed_precision=$mp" \
        "model.init=$WORK/pretrain_$mp/encoder" 2>&1 | tee "$WORK/fsdp$version.log" || return 1
    [[ -f $out/model/model.safetensors ]] || { echo "FSDP$version: no model written" && return 1; }
    # Accelerate's save_state writes pytorch_model_fsdp* only when the model really is FSDP-wrapped
    [[ -n $(find "$out/checkpoints" -name 'pytorch_model_fsdp*' -print -quit) ]] ||
        { echo "FSDP$version: the checkpoint holds no pytorch_model_fsdp* state: not an FSDP run" && return 1; }
    tensorboard_written "$out" && record_rate "fsdp$version"
}

section "8. fsdp: finetune/run.py under accelerate launch --use_fsdp, one GPU"
if ((DRY_RUN)); then
    echo "skipped in --dry-run: Accelerate on CPU silently runs plain DDP for --use_fsdp, so a CPU run checks nothing"
else
    # both versions run even if the first fails (a GPU is lent briefly); the section fails after them
    failed=()
    for version in 1 2; do
        fsdp_finetune "$version" || failed+=("FSDP$version")
    done
    ((${#failed[@]} == 0)) || fail "${failed[*]} failed (see above)"
fi

# ------------------------------------------------------------------------------------------------
section "9. summary: last throughput line of each stage run"
printf '%s\n' "${SUMMARY[@]}"
echo "gpu_check: all sections passed in $((SECONDS - START)) s; log: $LOG"
