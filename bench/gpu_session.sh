#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one command, most important first, inside a budget.
#
# Made for a GPU lent for minutes (this project's sessions get ~15 minutes of device time, one
# command at most 10): each phase runs under `timeout`, the whole script stops starting phases
# when its budget is spent, and the Table 2 phase uses `ablate --deadline` so that what it
# cannot finish is left, resumable, for the next session. Everything it prints goes to
# $OUT/session.log; the Table 2 results come back as $OUT/table2_miniature.{json,md} (commit
# them to results/: the next session resumes from there).
#
#   bash bench/gpu_session.sh                      # all phases, 540 s budget
#   BUDGET=300 bash bench/gpu_session.sh kernel roi_bench   # some phases
#
# Phases: kernel (the CuPy RoIAlign tests and the other CUDA tests of the RoI ops, NMS and the
# host-built tensors' copies, #3),
# roi_bench (bench/roi_align.py, #3; bench/nms.py on CUDA), parity (full-size torchvision parity on the GPU, #6),
# train_bench (bench/train_infer.py with a profile of each model's training step, #7),
# mini_step (not run by default: bench/mini_step.py, one miniature training step alone at 16,
# 32 and 64 images per batch, #8), table (Table 2 miniature, #8; the r50_fpn row is also #7's
# "miniature model on a GPU"), table_probe (not run by default: the table's costs, measured in a
# few minutes, for #8).
#
# TABLE_BATCH=N runs the table in batches of N images (`ablate --images-per-batch`: the same
# images, N/16 times the lr, 16/N times the steps); every session of one table must use the same
# N (a record of another batch size is refused). The default, TABLE_BATCH=auto, keeps the N of
# the committed results, or else of the trainings carried in (.carry, below), or else the
# smallest one up to 32 that mini_step priced within 1.2x of
# the cheapest in this session (bench/pick_batch.py), or else 16 (64 only when asked: on the CPU,
# 4x fewer steps of 64 left C4 with a quarter of the AP); of mini_step's sizes it only takes one whose
# TABLE_JOBS (8) trainings fit in the GPU's memory together, by the peaks mini_step measured.
# PROBE_BATCH=N does the same for table_probe. TABLE_CHANNELS_LAST=yes|no|auto: NHWC convolutions
# (`ablate --channels-last`); auto keeps the committed table's (or carried trainings') layout, else takes NHWC where
# mini_step timed it 5 % faster at the chosen batch, else NCHW.
#
# The device image lacks pycocotools; carry its wheel. On the CPU machine, once:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl pycocotools==2.0.10
# then run this script with carry [".whl"].
#
# The Table 2 bodies pre-trained on the GPU come back as $OUT/table2_bodies.tar (a few MB; weights
# are never committed). Keep them for the next lease, on the CPU machine:
#   mkdir -p .carry; cp FILES_AT/table2_bodies.tar .carry/   (.carry/ and .whl/ are git-ignored)
# and run the next lease with carry [".whl", ".carry"]: its table starts from the same bodies
# (the results' "Pre-trained bodies" section shows one digest each) without pre-training them.
#
# Trainings longer than a lease travel the same way. At the deadline each running training saves
# the iteration it is in (engine.TrainingStopped); the table phase packs the furthest along of
# those, one per file, as $OUT/table2_train_RUN__seedS.tar, in the file slots a lease has left
# (8 files come back, 16 MiB each: the C4 runs and R-50/R-101-FPN fit, the C5, MLP and
# X-101-FPN ones do not). Copy them into .carry/ beside the bodies (delete the ones carried
# before); the next lease resumes them first. TABLE_OVERRUN=K lets at most K trainings run that
# are expected to end after the deadline (ablate --may-overrun); the default, auto, is the
# number of file slots left for them.
#
# Time: the script ends within about BUDGET + 15 s (the table phase's last training stops 60 s
# before BUDGET, its cap is 5 s before, `timeout` kills 10 s after that, then the packing). The
# lease kills the whole command at its limit_s (timeout_s, or less where less device time is left
# once the machine has started), and whatever is not yet under $OUT then is lost: keep
# BUDGET <= limit_s - 45, i.e. 540 with timeout_s 600 and at least ~9.5 minutes of device time
# left after the start (docs/gpu.md, "Before a lease").
set -u
OUT=${OUT:-runs/gpu_session}
BUDGET=${BUDGET:-540}
TABLE_BATCH=${TABLE_BATCH:-auto}
TABLE_JOBS=${TABLE_JOBS:-8}
TABLE_CHANNELS_LAST=${TABLE_CHANNELS_LAST:-auto}
TABLE_OVERRUN=${TABLE_OVERRUN:-auto}
CARRY_MIB=15.5  # a carried training's file: its checkpoint, within the 16 MiB a file may have
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)  # absolute: some phases write there from other folders
LOG="$OUT/session.log"
START=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" MPLBACKEND=Agg
PY=${PYTHON:-python3}

# the carried wheels; pip's answer goes to the log too (it is the file that comes back and is
# kept), and a failed install stops nothing: the phases that need a wheel fail on their own
if ls .whl/*.whl >/dev/null 2>&1; then
    if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl >>"$LOG" 2>&1; then
        export PYTHONPATH="$PYTHONPATH:/tmp/site"
        echo "=== carried wheels installed: $(cd .whl && echo *.whl)" | tee -a "$LOG"
    else
        echo "=== carried wheels NOT installed (pip's error is in $LOG): $(cd .whl && echo *.whl)" | tee -a "$LOG"
    fi
fi

left() { echo $((BUDGET - ($(date +%s) - START))); }
# the files under $OUT: what comes back is counted in files (8), not in top-level entries
files_out() { find "$OUT" -type f | wc -l; }

# phase NAME CAP_SECONDS COMMAND...: run under min(CAP, what is left), log rc and time
phase() {
    local name=$1 cap=$2 budget
    shift 2
    budget=$(left)
    if [ "$budget" -lt 20 ]; then
        echo "=== $name: skipped, budget spent" | tee -a "$LOG"
        return
    fi
    [ "$cap" -gt "$budget" ] && cap=$budget
    echo "=== $name (at most ${cap} s): $*" | tee -a "$LOG"
    local t0=$(date +%s)
    timeout --signal=TERM --kill-after=10 "$cap" "$@" >>"$LOG" 2>&1
    local rc=$?
    echo "=== $name: rc=$rc in $(($(date +%s) - t0)) s" | tee -a "$LOG"
}

{
    echo "=== device"
    # the code that ran: the tree travels with uncommitted changes, and maybe without .git; the
    # same pipeline run from the repository's root on the CPU machine gives the same digest
    echo "source $(git rev-parse HEAD 2>/dev/null || echo '(no git here)'), source digest $(find bench mrcnn_edu tests \
        -type f \( -name '*.py' -o -name '*.cu' -o -name '*.sh' \) 2>/dev/null | LC_ALL=C sort | xargs -r sha256sum | sha256sum | cut -c1-16)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
    $PY -c "import cupy; print('cupy', cupy.__version__)" || echo "cupy: not importable"
    $PY -c "import torchvision; print('torchvision', torchvision.__version__)" || true
    $PY -c "import pycocotools; print('pycocotools ok')" || echo "pycocotools missing: carry .whl (see the header)"
} >>"$LOG" 2>&1

PHASES=${*:-kernel roi_bench parity train_bench table}
for p in $PHASES; do
    case $p in
    kernel)
        phase kernel 150 $PY -m pytest -q -rs -p no:cacheprovider tests/test_roi_align_cuda.py \
            tests/test_roi_align_kernel_source.py tests/test_roi_ops.py tests/test_boxes.py tests/test_device.py ;;
    roi_bench)
        phase roi_bench_fp32 60 $PY bench/roi_align.py --iters 30
        phase roi_bench_fp16 60 $PY bench/roi_align.py --iters 30 --dtype float16
        # NMS on CUDA (the whole matrix, in rounds) against torchvision's kernel
        phase nms_bench 60 $PY bench/nms.py --device cuda ;;
    parity)
        phase parity 150 $PY -m pytest -q -rs -s -p no:cacheprovider tests/test_weights.py -k gpu ;;
    train_bench)
        phase train_bench 150 $PY bench/train_infer.py --iters 10 --profile 5 ;;
    mini_step)
        # one Table 2 miniature training step alone, r50_c4 and r50_fpn, at 16, 32 and 64 images
        # per batch, with its profile, its peak memory, its host-device syncs and again in NHWC
        # (only where GroupNorm keeps NHWC on this PyTorch): the numbers the table's GPU budget is
        # made of, and which TABLE_BATCH and layout make it shortest (#8), in up to three minutes;
        # sizes run in turn for both runs, so a size the cap cuts off is left out of the choice
        phase mini_step 180 $PY bench/mini_step.py --images 16,32,64 --profile 3 --channels-last \
            --json "$OUT/mini_step.json" ;;
    table)
        # resume from the committed results; stop the trainings 60 s before the budget ends (below)
        mkdir -p runs/table2_miniature/pretrain runs/table2_miniature/train
        # The bodies an earlier lease pre-trained (.carry/table2_bodies.tar, see the header): every
        # row then starts from the same weights, and this lease spends no time pre-training. A
        # body pre-trained otherwise than the table now plans is dropped and made again.
        if [ -f .carry/table2_bodies.tar ]; then
            tar -xf .carry/table2_bodies.tar -C runs/table2_miniature/pretrain
            for f in runs/table2_miniature/pretrain/*.pth; do
                if $PY -c "import sys; from mrcnn_edu.ablations import check_pretrained_body; check_pretrained_body(sys.argv[1])" \
                    "$f" >>"$LOG" 2>&1; then
                    echo "=== carried body: $f" | tee -a "$LOG"
                else
                    rm -f "$f" && echo "=== carried body dropped (another pre-training): $f" | tee -a "$LOG"
                fi
            done
        fi
        batch=$TABLE_BATCH
        if [ "$batch" = auto ]; then  # the committed table's size, else the carried trainings', else mini_step's, else 16
            batch=$($PY bench/pick_batch.py --mini-step "$OUT/mini_step.json" --carried .carry \
                --results results/table2_miniature.json --jobs "$TABLE_JOBS" 2>>"$LOG") || batch=""
            echo "=== TABLE_BATCH=auto: ${batch:-16, the schedule default}" | tee -a "$LOG"
        fi
        nhwc=$TABLE_CHANNELS_LAST
        if [ "$nhwc" = auto ]; then  # the committed table's layout, else mini_step's faster one
            nhwc=$($PY bench/pick_batch.py --mini-step "$OUT/mini_step.json" --carried .carry \
                --results results/table2_miniature.json --jobs "$TABLE_JOBS" --channels-last-at "${batch:-16}" \
                2>>"$LOG") || nhwc=no
            echo "=== TABLE_CHANNELS_LAST=auto: $nhwc" | tee -a "$LOG"
        fi
        [ "$nhwc" = yes ] && nhwc_flag=--channels-last || nhwc_flag=""
        # Trainings an earlier lease stopped at its deadline: resumed first, if of this schedule
        for t in .carry/table2_train_*.tar; do
            [ -f "$t" ] || continue
            name=$(basename "$t" .tar); name=${name#table2_train_}
            tar -xf "$t" -C runs/table2_miniature/train 2>>"$LOG" || { echo "=== carried training unreadable: $t" | tee -a "$LOG"; continue; }
            if $PY -c "import sys; from mrcnn_edu import ablations as a
print(a.saved_progress('runs/table2_miniature', sys.argv[1], int(sys.argv[2]), a.train_config('shapes', False, 0, '', None, int(sys.argv[3]) if sys.argv[3] else None, sys.argv[4] == 'yes')))" \
                "${name%__seed*}" "${name##*__seed}" "$batch" "$nhwc" >>"$LOG" 2>&1; then
                echo "=== carried training: $name" | tee -a "$LOG"
            else
                rm -rf "runs/table2_miniature/train/$name"
                echo "=== carried training dropped (another schedule): $name" | tee -a "$LOG"
            fi
        done
        # the results JSON and markdown, the logs and the bodies take 4 of the 8 files that come back
        overrun=$TABLE_OVERRUN
        if [ "$overrun" = auto ]; then
            overrun=$((8 - $(files_out) - 4))
            [ "$overrun" -lt 0 ] && overrun=0
        fi
        echo "=== TABLE_OVERRUN: $overrun" | tee -a "$LOG"
        # the deadline keeps 60 s back: up to 30 s for a training already evaluating to finish
        # (15 s for the others to save their step), then the report; as a wall-clock time, so
        # that ablate's own start-up counts against it; the phase's cap is 55 s after it
        deadline=$(($(left) - 60))
        if [ "$deadline" -ge 60 ]; then
            phase table $((deadline + 55)) $PY -m mrcnn_edu ablate --table 2 --seeds 3 --jobs "$TABLE_JOBS" \
                ${batch:+--images-per-batch "$batch"} $nhwc_flag --deadline-at "$(($(date +%s) + deadline))" \
                --may-overrun "$overrun" --overrun-max-mib "$CARRY_MIB"
        else
            echo "=== table: skipped, budget spent ($deadline s to the deadline: no training could save a step)" | tee -a "$LOG"
        fi
        cp results/table2_miniature.json results/table2_miniature.md "$OUT/" 2>/dev/null
        (cd runs/table2_miniature/pretrain && ls *.pth >/dev/null 2>&1 && tar -cf "$OUT/table2_bodies.tar" *.pth)
        # the stopped trainings, furthest along first, one file each, while file slots are left;
        # only those the report lists as left (a training finished in an earlier lease, carried in
        # again by mistake, has no result file on this machine but is no longer left)
        left_names=$($PY -c "import json; s = json.load(open('results/table2_miniature.json'))['sessions'][-1]
print(' '.join(['-'] + [f'{run}__seed{seed}' for run, seed in s['left']]))" 2>/dev/null) || left_names=""
        for d in runs/table2_miniature/train/*__seed*; do
            name=$(basename "$d")
            [ -f "runs/table2_miniature/results/$name.json" ] && continue  # finished
            [ -n "$left_names" ] && [[ " $left_names " != *" $name "* ]] && continue  # not left
            if [ -f "$d/last_checkpoint" ]; then
                echo "$(cat "$d/last_checkpoint") $name"
            else  # killed between its first checkpoint's rename and the pointer's: the newest file
                newest=$(cd "$d" && ls model_[0-9]*.pth 2>/dev/null | sort | tail -n 1)
                [ -n "$newest" ] && echo "$newest $name"
            fi
        done | sort -r | while read -r checkpoint name; do
            [ "$(files_out)" -ge 7 ] && { echo "=== not carried (no file slot left): $name" | tee -a "$LOG"; continue; }
            # sessions.json: the device and commit of each lease that trained it (ablations.log_session)
            sessions=""; [ -f "runs/table2_miniature/train/$name/sessions.json" ] && sessions="$name/sessions.json"
            pointer=""; [ -f "runs/table2_miniature/train/$name/last_checkpoint" ] && pointer="$name/last_checkpoint"
            tar -cf "$OUT/table2_train_$name.tar" -C runs/table2_miniature/train \
                $pointer "$name/$checkpoint" "$name/metrics.jsonl" $sessions
            if [ "$(stat -c %s "$OUT/table2_train_$name.tar")" -gt $((16 * 1024 * 1024)) ]; then
                rm -f "$OUT/table2_train_$name.tar"
                echo "=== not carried (over 16 MiB): $name" | tee -a "$LOG"
            else
                echo "=== carried out: $name at $checkpoint" | tee -a "$LOG"
            fi
        done
        {
            tail -n 40 runs/table2_miniature/logs/*.log
            # the seconds per iteration of every training, also of those stopped at the deadline:
            # what the next lease's schedule is planned from
            for f in runs/table2_miniature/train/*/metrics.jsonl; do
                echo "== $f"
                cut -c1-400 "$f"
            done
        } >"$OUT/table2_logs.txt" 2>/dev/null ;;
    table_probe)
        # When too little device time is left for the table (a 15-minute lease, the other phases
        # first): what the table's schedule needs to be tuned. Generation of the set, pre-training
        # of one body (R-mini-50, with its log's rate), then 8 short trainings at once (r50_c4 and
        # r50_fpn, 4 seeds each, PROBE_ITERS iterations) with their seconds per iteration and,
        # where they finish, COCOeval's time. Its table goes to $OUT/probe, never to results/.
        mkdir -p runs/table2_probe
        deadline=$(($(left) - 60))
        # PROBE_ROWS, PROBE_SEEDS, PROBE_JOBS, PROBE_ITERS (in 16-image iterations), PROBE_BATCH change it; PROBE_NO_PRETRAIN=1 skips
        # the pre-training (e.g. one training alone: is a training slow by itself, or by sharing?)
        phase table_probe $((deadline + 55)) $PY -m mrcnn_edu ablate --table 2 \
            --rows "${PROBE_ROWS:-r50_c4,r50_fpn}" --seeds "${PROBE_SEEDS:-4}" --jobs "${PROBE_JOBS:-8}" \
            --max-iter "${PROBE_ITERS:-200}" ${PROBE_NO_PRETRAIN:+--no-pretrain} --out "$OUT/probe" \
            ${PROBE_BATCH:+--images-per-batch "$PROBE_BATCH"} \
            --workdir runs/table2_probe --deadline-at "$(($(date +%s) + deadline))"
        {
            tail -n 25 runs/table2_probe/logs/*.log
            for f in runs/table2_probe/train/*/metrics.jsonl; do
                echo "== $f"
                cut -c1-400 "$f"
            done
            $PY - <<'PYEOF'
import glob, json
for path in sorted(glob.glob("runs/table2_probe/results/*.json")):
    r = json.load(open(path))
    print(r["run"], "seed", r["seed"], "iterations", r["iterations"], "train_s", round(r["train_time_s"], 1),
          "wall_s", round(r["wall_time_s"], 1), "box AP", r["metrics"]["bbox"]["AP"], "mask AP", r["metrics"]["segm"]["AP"])
PYEOF
        } >"$OUT/table2_probe.txt" 2>&1 ;;
    *) echo "unknown phase $p" | tee -a "$LOG" ;;
    esac
done
echo "=== total $(($(date +%s) - START)) s" | tee -a "$LOG"
