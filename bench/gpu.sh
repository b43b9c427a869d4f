#!/usr/bin/env bash
# Every GPU benchmark of the project in one go (<= 8 minutes on one H100), ending in one table.
#
#   bench/gpu.sh            # on a CUDA machine: tile stream vs encoder alone (gigapath, bf16) with each pixel
#                           # reader (openslide, tifffile), slide encoder (eager and compiled), tile readers on
#                           # this machine's cores (vlm's two, + tiffslide / fastslide / cuCIM if installed; grid
#                           # and random reads), a fine-tuning step, then the CUDA-only tests (pytest -m gpu)
#   bench/gpu.sh --smoke    # the same scripts and paths at toy sizes on the CPU (tiny models, a few tiles, one
#                           # round; under a minute on an idle 2-core box): proves the script runs, measures nothing
#
# Environment: PYTHON (default: python), VLM_WHEELS (a folder of wheels installed first, offline, if it exists),
# WORKERS (tile-reading processes; default: CPU cores - 1), COMPILE=1 (also time the torch.compile'd encoder;
# with --smoke, also smoke-test the compiled paths: about a minute more of compiling on 2 cores).
set -euo pipefail
case "${1:-}" in
  "" | --smoke) ;;
  *) echo "usage: bench/gpu.sh [--smoke]" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [[ -n "${VLM_WHEELS:-}" && -d "$VLM_WHEELS" ]]; then
  "$PYTHON" -m pip install --quiet --no-index --find-links "$VLM_WHEELS" "$VLM_WHEELS"/*.whl
fi
"$PYTHON" - <<'PY'
import importlib.util, sys
needed = ["torch", "timm", "transformers", "h5py", "pandas", "pyarrow", "openslide", "tifffile", "imagecodecs",
          "skimage", "open_clip", "tqdm", "pytest"]
missing = [name for name in needed if importlib.util.find_spec(name) is None]
if missing:
    sys.exit(f"bench/gpu.sh: missing Python modules {missing}; put their wheels in a folder and set VLM_WHEELS")
PY
RESULTS=$(mktemp -d)/results.jsonl
START=$SECONDS

if [[ "${1:-}" == "--smoke" ]]; then
  # every path of the full run below, at toy sizes: timm's test_vit tile encoder (0.06 GFLOP a tile), the tiny
  # slide-encoder preset and towers, a few tiles, one round (the figures mean nothing; every step must run)
  export OMP_NUM_THREADS=1
  COMPILE_SMOKE=()
  if [[ "${COMPILE:-0}" == "1" ]]; then COMPILE_SMOKE=(--compiled-tiles 200); fi
  "$PYTHON" bench/embed_tiles.py --device cpu --model timm:test_vit --n-slides 2 --min-tiles 4 --max-tiles 8 \
    --batch-size 4 --workers 1 --readers openslide tifffile --json "$RESULTS"
  if [[ "${COMPILE:-0}" == "1" ]]; then
    "$PYTHON" bench/embed_tiles.py --device cpu --model timm:test_vit --n-slides 1 --min-tiles 4 --max-tiles 4 \
      --batch-size 4 --workers 1 --compile --no-baseline --json "$RESULTS"
  fi
  "$PYTHON" bench/slide_encoder.py --device cpu --model tiny --tiles 200 --baseline-tiles 200 \
    "${COMPILE_SMOKE[@]}" --threads 1 --json "$RESULTS"
  "$PYTHON" bench/readers.py --size 3000 --tiles 20 --workers 1 --rounds 1 --readers openslide tifffile \
    --json "$RESULTS"
  "$PYTHON" bench/readers.py --size 3000 --tiles 20 --workers 1 --rounds 1 --readers openslide tifffile \
    --pattern random --json "$RESULTS"
  "$PYTHON" bench/train.py --device cpu --batch 4 --chunk 2 --min-tiles 20 --max-tiles 40 --steps 1 \
    --json "$RESULTS"
else
  "$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'bench/gpu.sh needs CUDA (or --smoke)'"
  WORKERS=${WORKERS:-$(( $(nproc) - 1 ))}
  # 12 mixed slides of 500-3,000 tissue tiles (~21k tiles): stream, old per-slide path, encoder alone
  "$PYTHON" bench/embed_tiles.py --device cuda --model gigapath --n-slides 12 --min-tiles 500 --max-tiles 3000 \
    --batch-size 128 --workers "$WORKERS" --precision bf16 --readers openslide tifffile --json "$RESULTS"
  # the reader is the wall for a smaller encoder: ViT-B/16 (~1/5 of ViT-g's FLOPs), stream with each reader
  "$PYTHON" bench/embed_tiles.py --device cuda --model timm:vit_base_patch16_224 --n-slides 12 --min-tiles 500 \
    --max-tiles 3000 --batch-size 256 --workers "$WORKERS" --precision bf16 --readers openslide tifffile \
    --no-baseline --json "$RESULTS"
  if [[ "${COMPILE:-0}" == "1" ]]; then
    "$PYTHON" bench/embed_tiles.py --device cuda --model gigapath --n-slides 4 --min-tiles 500 --max-tiles 3000 \
      --batch-size 128 --workers "$WORKERS" --precision bf16 --compile --no-baseline --json "$RESULTS"
  fi
  "$PYTHON" bench/slide_encoder.py --device cuda --precision bf16 --tiles 10000 70000 --baseline-tiles 10000 \
    --compiled-tiles 10000 --json "$RESULTS"
  # the CPU feed: vlm's readers (+ tiffslide / fastslide / cuCIM if installed), processes vs threads, this
  # machine's cores; vlm's grid reads, then random 256-px reads (4 tiles decoded each)
  "$PYTHON" bench/readers.py --size 24000 --tiles 4000 --workers "$WORKERS" --json "$RESULTS"
  "$PYTHON" bench/readers.py --size 24000 --tiles 2000 --workers "$WORKERS" --pattern random --json "$RESULTS"
  "$PYTHON" bench/train.py --device cuda --full --batch 16 --chunk 4 --min-tiles 3000 --max-tiles 6000 \
    --grad-checkpointing --steps 2 --json "$RESULTS"
  "$PYTHON" -m pytest -q -m gpu tests/ -p no:cacheprovider || echo "gpu tests FAILED" >&2
fi

"$PYTHON" - "$RESULTS" "$(( SECONDS - START ))" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
print(f"\n| bench | case | device | value | vs encoder alone | MFU | peak GB |\n|---|---|---|---|---|---|---|")
for r in rows:
    ratio = f"{100 * r['ratio_to_encoder']:.0f} %" if r.get("ratio_to_encoder") is not None else ""
    mfu = f"{100 * r['mfu']:.0f} %" if r.get("mfu") is not None else ""
    peak = r.get("peak_gb", "")
    print(f"| {r['bench']} | {r['case']} | {r['device']} | {r['value']} {r['unit']} | {ratio} | {mfu} | {peak} |")
print(f"\n(all benchmarks: {sys.argv[2]} s)")
PY
