#!/usr/bin/env bash
# Reproduces the phantom experiments of docs/results.md and the shipped demo bundle.
#   bench/phantom_experiments.sh [data|train|eval|all]   (defaults to all; ~6 h on a 2-core CPU)
# Fixed seeds throughout: phantoms seed 0 (internal) and 1 (external site), training seed 0.
set -euo pipefail
cd "$(dirname "$0")/.."
MM=.venv/bin/mmcontour
export OMP_NUM_THREADS=1   # one thread per run: two runs share the 2 cores without spin-waiting
STEP=${1:-all}
# --region-weight 5: the nodal levels (regions maps, labels 5-10) weigh 6x in Dice + CE; --soft-labels:
# partial-volume targets; 5 mm slices on the model grid. Without these the models learned side and
# surgery but not the N stage (docs/results.md, "What it took").
# --shift-margin 0: stages 1-5 were trained before the shift margin existed (stage 6 sets it).
# --prompt-template table5-v1: stages 1-9 read a bilateral note in one pass (stage 10 reads each side apart).
COMMON=(--feature-size 8 --spacing 5 5 5 --patch 80 64 48 --batch-size 2 --epochs 20 --lr 1e-3
        --warmup-epochs 2 --val-every 10 --seed 0 --region-weight 5 --soft-labels --shift-margin 0
        --prompt-template table5-v1 --json)

if [[ $STEP == data || $STEP == all ]]; then
  $MM phantom --n 160 --out data/phantoms --seed 0 --planning-fov
  $MM phantom --n 30 --out data/external --seed 1 --external --planning-fov
  # stage 8: 24 more bilateral training cases (the internal set has 4), merged into one training manifest
  $MM phantom --n 24 --out data/bilateral --seed 2 --planning-fov --bilateral-share 1 --splits 1 0 0
  $MM merge-manifests data/phantoms/manifest.csv data/bilateral/manifest.csv --out data/train-mix.csv --overwrite
  # stage 13: 40 more training cases, 29 of them lying with their arms down (the internal set is all arms-up;
  # v12 lost the axilla on arms-down CTs), and 20 internal arms-down test cases
  $MM phantom --n 40 --out data/arms --seed 4 --planning-fov --arms-up 0.3 --splits 1 0 0
  $MM phantom --n 20 --out data/arms-down --seed 5 --planning-fov --arms-up 0 --splits 0 0 1
  $MM merge-manifests data/phantoms/manifest.csv data/bilateral/manifest.csv data/arms/manifest.csv \
    --out data/train-mix-arms.csv --overwrite
  # stage 14: a quarter of the one-sided training cases again, with the other side in the note and that note's
  # CTV (v13 kept half the operated chest wall when a flipped note contradicted a visible mastectomy)
  $MM side-flips data/train-mix-arms.csv --out data/side-flips --share 0.25 --seed 14 --overwrite
  $MM merge-manifests data/train-mix-arms.csv data/side-flips/manifest.csv --out data/train-mix-flips.csv --overwrite
fi
if [[ $STEP == train || $STEP == all ]]; then
  run() {  # folder, bundle name, extra args...
    local name=$1 bundle=$2; shift 2
    $MM train --manifest data/phantoms/manifest.csv --out runs/$name --name "$bundle" "${COMMON[@]}" "$@" \
      > runs/$name.json 2> runs/$name.log
  }
  mkdir -p runs
  run multimodal mmcontour-demo --text-encoder llm --version 5 & run vision mmcontour-vision --text-encoder none --version 5 & wait
  # stages 2-4: more epochs from the stage before, each a new cosine from lr 5e-4 (`--init`). Stage 2 (v5):
  # 10 epochs; the small nodal levels (10-25 cc) were still being learned. Stage 3: 15 epochs (level 4
  # learned). Stages 4 and 5 (v6): 15 and 10 epochs with the class-balanced cross-entropy (--class-balance
  # 1), which pulls the levels still taken for background (internal mammary, left levels 2-3) out of it.
  # Stage 6 (v7): 10 epochs at lr 3e-4 with 60 mm of air around each training CT (--shift-margin 60): the
  # 80-voxel patch was as wide as the 400 mm field of view, so v6 had learned where the field of view ends
  # and lost the internal mammary nodes when a CT's model grid was wider (oblique CTs; 9 mm of air added).
  # Stage 7 (v8): 10 more epochs at lr 2e-4 with the 4 bilateral training cases visited 5 times per epoch
  # (--oversample side=both:5): bilateral notes were most of the N0 <-> N2 failures.
  # Stage 8 (v9): 10 more epochs at lr 2e-4 on the training set plus 24 bilateral phantoms
  # (data/train-mix.csv: 28 of 120 training cases bilateral, no oversampling): the bilateral N0 notes
  # themselves still got nodes on the right with 4 bilateral training cases.
  # Stage 9 (v10): 6 more epochs at lr 1.5e-4 on the same set, bilateral cases visited 3 times.
  # Stages 10-11 (v11, shipped; the multimodal model only, the vision-only one reads no note): prompt
  # template table5-v2 (each side of a bilateral note read on its own; read in one pass, the right side's
  # N stage of a bilateral note hardly reached the embedding): 8 epochs at lr 2e-4 with the bilateral
  # cases visited 3 times, then 6 at lr 1e-4 without oversampling (unilateral contours had lost some Dice).
  # Stage 12 (v12): 6 epochs at lr 1.5e-4 with the nodal weight grown 15 mm beyond the levels
  # (--emphasis-margin 15): with the weight stepping at their borders, v11 drew every level too large.
  # Stage 13 (v13): the same, 6 epochs from v12 on data/train-mix-arms.csv (arms-down patients).
  # Stage 14 (v14, shipped): 4 epochs at lr 1e-4 from v13 on data/train-mix-flips.csv (side-flipped notes).
  # Stages 13 and 14 ran with OMP_NUM_THREADS=2 (one run alone on the 2 cores).
  stage() {  # from folder, to folder, epochs, seed, bundle name, extra args (a later --manifest replaces the first)
    local from=$1 to=$2 epochs=$3 seed=$4 bundle=$5; shift 5
    $MM train --manifest data/phantoms/manifest.csv --out runs/$to --name "$bundle" "${COMMON[@]}" \
      --epochs "$epochs" --lr 5e-4 --warmup-epochs 1 --val-every 5 --seed "$seed" --init runs/$from/best "$@" \
      > runs/$to.json 2> runs/$to.log
  }
  for model in "multimodal mmcontour-demo llm" "vision mmcontour-vision none"; do
    set -- $model
    ( stage $1 $1-ft 10 1 $2 --text-encoder $3 --version 5
      stage $1-ft $1-s3 15 2 $2 --text-encoder $3 --version 6
      stage $1-s3 $1-s4 15 3 $2 --text-encoder $3 --version 6 --class-balance 1
      stage $1-s4 $1-s5 10 4 $2 --text-encoder $3 --version 6 --class-balance 1
      stage $1-s5 $1-s6 10 5 $2 --text-encoder $3 --version 7 --shift-margin 60 --lr 3e-4 --warmup-epochs 0
      stage $1-s6 $1-s7 10 6 $2 --text-encoder $3 --version 8 --shift-margin 60 --lr 2e-4 --warmup-epochs 0 \
        --oversample side=both:5
      stage $1-s7 $1-s8 10 7 $2 --text-encoder $3 --version 9 --shift-margin 60 --lr 2e-4 --warmup-epochs 0 \
        --manifest data/train-mix.csv
      stage $1-s8 $1-s9 6 8 $2 --text-encoder $3 --version 10 --shift-margin 60 --lr 1.5e-4 --warmup-epochs 0 \
        --val-every 3 --manifest data/train-mix.csv --oversample side=both:3 ) &
  done
  wait
  stage multimodal-s9 multimodal-s10 8 9 mmcontour-demo --text-encoder llm --version 11 --shift-margin 60 --lr 2e-4 \
    --warmup-epochs 0 --val-every 4 --manifest data/train-mix.csv --oversample side=both:3 --prompt-template table5-v2
  stage multimodal-s10 multimodal-s11 6 10 mmcontour-demo --text-encoder llm --version 11 --shift-margin 60 --lr 1e-4 \
    --warmup-epochs 0 --val-every 3 --manifest data/train-mix.csv --prompt-template table5-v2
  stage multimodal-s11 multimodal-s12 6 12 mmcontour-demo --text-encoder llm --version 12 --shift-margin 60 --lr 1.5e-4 \
    --warmup-epochs 0 --val-every 3 --manifest data/train-mix.csv --prompt-template table5-v2 --emphasis-margin 15
  stage multimodal-s12 multimodal-s13 6 13 mmcontour-demo --text-encoder llm --version 13 --shift-margin 60 --lr 1.5e-4 \
    --warmup-epochs 0 --val-every 3 --manifest data/train-mix-arms.csv --prompt-template table5-v2 --emphasis-margin 15
  stage multimodal-s13 multimodal-s14 4 14 mmcontour-demo --text-encoder llm --version 14 --shift-margin 60 --lr 1e-4 \
    --warmup-epochs 0 --val-every 2 --manifest data/train-mix-flips.csv --prompt-template table5-v2 --emphasis-margin 15
  run multimodal-40 mmcontour-multimodal-40 --text-encoder llm --fraction 0.4 --version 5 &
  run vision-40 mmcontour-vision-40 --text-encoder none --fraction 0.4 --version 5 & wait
fi
if [[ $STEP == eval || $STEP == all ]]; then
  for set in phantoms:test external:all; do
    data=${set%%:*}; split=${set##*:}
    $MM evaluate --bundle runs/vision-s9/best runs/multimodal-s14/best --label vision-only MMContour \
      --manifest data/$data/manifest.csv --split $split --out runs/eval-$data --json > runs/eval-$data.json &
    $MM evaluate --bundle runs/vision-40/best runs/multimodal-40/best --label vision-only-40% MMContour-40% \
      --manifest data/$data/manifest.csv --split $split --out runs/eval-$data-40 --json > runs/eval-$data-40.json &
    wait
  done
fi
