#!/usr/bin/env bash
# The shape of the Inception-ResNet reference ablation — baseline → + class weights →
# + augmentation/oversampling (micro-F1 65.10 → 68.21 → 74.45 on its own 18-label set) — on
# PASCAL VOC 2007, official train (2,500) → val (2,508), at a scale a 2-core CPU affords:
# the ResNet-18 layout from scratch (advanced_cnn) at 128 px, 10 epochs, batch 32, one seed —
# the settings of the VOC foundation run in RESULTS.md (~25-35 s/epoch uncontended on machine A;
# the oversampled variant's epochs are 1.5× longer: 2,500 → ~3,760 images), so ~20-30 min in all.
#
# Variants are cumulative, as in the reference, so they come from a grid file of named bundles:
#   baseline         BCE, no augmentation (aug.preset=none), no oversampling
#   +class_weights   BCE with pos_weight = negatives/positives per class, clipped to [1, 50]
#   +aug_oversample  + the "standard" augmentation preset (flip, crop 0.6-1, ±15°, jitter 0.3) and
#                    oversampling to ~200 positives per label (sheep 48 → 200; capped at ×10)
# VOC here has no test split, so thresholds are fitted on val and the calibrated F1 columns are
# optimistic; mAP and "micro-F1 @0.5" are the unbiased columns.
#
# Usage, from anywhere:  bash benchmarks/ablation_voc.sh [OUT_DIR]   (default runs/ablation-voc)
# Running it again with the same OUT_DIR resumes: finished variants are skipped.
# Then copy OUT_DIR/ablation.md into benchmarks/RESULTS.md with the machine's CPU flags
# (grep -o -w -E 'avx512_bf16|amx_bf16|avx2' /proc/cpuinfo | sort -u) and what it shows.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/ablation-voc}
DATA=${VOC_DATA:-../shared/data/voc2007}
mkdir -p "$OUT"
cat > "$OUT/grid.yaml" <<'GRID'
variants:
  baseline:       {train.class_weights: none,     aug.preset: none,     data.oversample_to: 0}
  +class_weights: {train.class_weights: balanced, aug.preset: none,     data.oversample_to: 0}
  +aug_oversample: {train.class_weights: balanced, aug.preset: standard, data.oversample_to: 200}
GRID
time .venv/bin/multitag ablate --data "$DATA" --grid "$OUT/grid.yaml" --out "$OUT" \
  --set model.name=advanced_cnn --set data.image_size=128 --set train.epochs=10 --set train.batch_size=32 \
  --set optim.lr=0.002 --set train.seed=0
cat "$OUT/ablation.md"
