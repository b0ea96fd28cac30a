#!/usr/bin/env bash
# Issue 18's before/after on one CUDA card, in one run: extraction of the ADReSSo-sized corpus through the CLI
# (GPU busy share, forward ceiling) and one fine-tuning epoch, with the code before issue 18 and with this tree,
# then this tree's profile; then issue 27's transcription, batched (float16) against one recording at a time
# (BEFORE_ASR: a tree of the code before batching, `git archive 02dd80c adsearch`) and against faster-whisper's
# own pipeline on the same chunks. About 7 minutes on an H100 at the default sizes; every result lands in OUT as it
# is measured, so a run cut short keeps what it finished.
#
# Here, before calling the device (the old code travels as an untracked folder of the working tree):
#   git archive 96929d6 adsearch | (mkdir -p before-issue18 && tar -x -C before-issue18)
# There:
#   bash benchmarks/gpu_before_after.sh before-issue18 "$OUT"
# Afterwards here: rm -rf before-issue18
set -euo pipefail
before=$(cd "${1:?usage: gpu_before_after.sh BEFORE_TREE OUT_DIR}" && pwd)
out=$(mkdir -p "${2:?usage: gpu_before_after.sh BEFORE_TREE OUT_DIR}" && cd "$2" && pwd)
after=$(cd "$(dirname "$0")/.." && pwd)
scale=${SCALE:-0.5}            # share of the 237 recordings extracted
recordings=${RECORDINGS:-80}   # fine-tuning recordings of about a minute
cd "$after"
[ -f "$before/adsearch/__init__.py" ] || { echo "$before holds no adsearch package" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    | tee -a "$out/gpu.txt"
run() {  # run TAG SRC ARGS...: one benchmark with the adsearch package of SRC, its output kept
    local tag=$1 src=$2; shift 2
    echo "== $tag"
    PYTHONPATH="$src" python "$@" 2>&1 | tee "$out/$tag.txt"
}
run extract-after "$after" benchmarks/extract.py --corpus-like adresso --size large --device cuda \
    --dtype bfloat16 --corpus-scale "$scale" --ceiling-seconds 30 --json "$out/extract-after.json"
run extract-before "$before" benchmarks/extract.py --corpus-like adresso --size large --device cuda \
    --dtype bfloat16 --corpus-scale "$scale" --ceiling-seconds 0 --json "$out/extract-before.json"
run finetune-after "$after" benchmarks/finetune.py cuda --recordings "$recordings" --json "$out/finetune-after.json"
run finetune-before "$before" benchmarks/finetune.py cuda --recordings "$recordings" \
    --json "$out/finetune-before.json"
run profile-after "$after" benchmarks/profile_extract.py --size large --device cuda --dtype bfloat16 \
    --corpus-scale 0.25 --json "$out/profile-after.json"
# Issue 27: the synthetic corpus needs eSpeak NG (libespeak-ng); without it this step says so and the rest stands.
run transcribe-batched "$after" benchmarks/transcribe.py batched --device cuda --batch-sizes 8 16 \
    ${BEFORE_ASR:+--before "$BEFORE_ASR"} --json "$out/transcribe-batched.json" \
    || echo "transcription: failed (see $out/transcribe-batched.txt; the synthetic corpus needs eSpeak NG)"
