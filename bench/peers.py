"""vlm side by side with its peers (hs2p, lazyslide, slide2vec) on the same slide and the same model.

The peers are never vlm dependencies: install them into a separate environment and name its Python with
`--peers-python` (e.g. `python3 -m venv /tmp/peers && /tmp/peers/bin/pip install torch hs2p lazyslide
slide2vec`). Every measurement runs in a fresh child process (vlm's with this Python, the peers' with theirs),
so imports, caches and peak memory are each case's own; rounds are interleaved (every tool once per round), so
each ratio compares figures from the same minutes of machine load. Cases:

- `tissue + grid`: tissue detection and the 256-px tile grid at 0.5 µm/px (vlm `tile_slide`, hs2p
  `tile_slide` with Otsu, lazyslide `find_tissues` + `tile_tissues`);
- `tile features`: that, then every tile through the same random-weight timm resnet18 (seed 0) on the CPU
  (vlm `embed_grid`, lazyslide `feature_extraction`; slide2vec only runs named hub models, so it says why);
- `raw reads`: `--reads` random 256-px level-0 reads as RGB arrays with one handle (vlm `--reader auto`, i.e.
  tifffile, and `--reader openslide`; hs2p's and lazyslide's default readers; fastslide where installed).

The slide is a generated JPEG pyramidal TIFF (0.25 µm/px, 5 levels) unless `--slide` names one. A peer that
is missing or cannot run offline is reported with the reason, and the table goes on without it.

    python bench/peers.py --peers-python /work/peers-venv/bin/python [--size 12000] [--rounds 2] [--reads 400]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

log = logging.getLogger("bench.peers")
VLM_ROOT = Path(__file__).resolve().parents[1]

# Each child reads SLIDE, READS from the environment and prints one JSON line: seconds, count, version.
_PRELUDE = """
import json, os, sys, time
import numpy as np
SLIDE, READS = os.environ["SLIDE"], int(os.environ["READS"])
def done(seconds, count, version):
    # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so a child would report its parent's peak
    peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) / 1024
    print(json.dumps({"seconds": seconds, "count": int(count), "version": version, "peak_mb": round(peak)}))
def random_xy(width, height):
    return np.random.default_rng(0).integers(0, [width - 256, height - 256], (READS, 2))
def resnet18():
    import timm, torch
    torch.manual_seed(0)
    return timm.create_model("resnet18", pretrained=False, num_classes=0).eval()
"""

CHILDREN: dict[str, dict[str, str]] = {
    "tissue + grid": {
        "vlm": """
import vlm
from vlm.wsi.slide import open_slide
from vlm.wsi.tiling import tile_slide
start = time.perf_counter()
with open_slide(SLIDE) as slide:
    grid = tile_slide(slide).grid
done(time.perf_counter() - start, len(grid), "0.1.0")
""",
        "hs2p": """
import hs2p
from pathlib import Path
from hs2p import SegmentationConfig, SlideSpec, TilingConfig, tile_slide
start = time.perf_counter()
result = tile_slide(SlideSpec(sample_id="s", image_path=Path(SLIDE)),
    tiling=TilingConfig(requested_spacing_um=0.5, requested_tile_size_px=256, tolerance=0.05, overlap=0.0),
    segmentation=SegmentationConfig(method="otsu"))
done(time.perf_counter() - start, len(result.tiles.x), hs2p.__version__)
""",
        "lazyslide": """
import lazyslide as zs
start = time.perf_counter()
wsi = zs.open_wsi(SLIDE)
zs.pp.find_tissues(wsi)
zs.pp.tile_tissues(wsi, 256, mpp=0.5)
done(time.perf_counter() - start, len(wsi["tiles"]), zs.__version__)
""",
    },
    "tile features": {
        "vlm": """
import torch
from vlm.encoders.tile import create_tile_encoder
from vlm.tile_features import embed_grid
from vlm.wsi.slide import open_slide
from vlm.wsi.tiling import tile_slide
torch.set_num_threads(int(os.environ.get("THREADS", "1")))
torch.manual_seed(0)
encoder = create_tile_encoder("timm:resnet18", pretrained=False)
start = time.perf_counter()
with open_slide(SLIDE) as slide:
    grid = tile_slide(slide).grid
features = embed_grid(SLIDE, grid, encoder, "cpu", batch_size=32, workers=1)
done(time.perf_counter() - start, len(features), "0.1.0")
""",
        "lazyslide": """
import torch, timm.data, lazyslide as zs
from torchvision.transforms import v2
torch.set_num_threads(int(os.environ.get("THREADS", "1")))
model = resnet18()
# A plain model gets lazyslide's tiles as HWC uint8 arrays: the transform vlm takes from timm's pretrained_cfg
# (resize by crop_pct, centre crop, ImageNet mean/std), on tensors
cfg = timm.data.resolve_data_config({}, model=model)
side = cfg["input_size"][-1]
transform = v2.Compose([
    v2.ToImage(), v2.Resize(int(side / cfg["crop_pct"]), v2.InterpolationMode(cfg["interpolation"]), antialias=True),
    v2.CenterCrop(side), v2.ToDtype(torch.float32, scale=True), v2.Normalize(cfg["mean"], cfg["std"])])
start = time.perf_counter()
wsi = zs.open_wsi(SLIDE)
zs.pp.find_tissues(wsi)
zs.pp.tile_tissues(wsi, 256, mpp=0.5)
zs.tl.feature_extraction(wsi, model=model, transform=transform, model_name="resnet18", device="cpu", batch_size=32,
                         num_workers=1, pbar=False)
done(time.perf_counter() - start, len(wsi["tiles"]), zs.__version__)
""",
        "slide2vec": """
import importlib.util
if importlib.util.find_spec("slide2vec") is None:
    sys.exit("not installed (it pulls hs2p[asap,cucim,sam2,vips]: cuCIM is CUDA-only)")
sys.exit("its encoder registry (slide2vec/encoders/models: uni, virchow, gigapath, conch, ...) holds named "
         "foundation models whose weights come from the Hugging Face Hub (unreachable offline); no resnet18")
""",
    },
    "raw reads": {
        "vlm (tifffile)": """
from vlm.wsi.slide import open_slide
with open_slide(SLIDE, mpp=0.25) as slide:
    xy = random_xy(*slide.dimensions)
    start = time.perf_counter()
    for x, y in xy:
        slide.read_region_array((int(x), int(y)), 0, (256, 256))
    done(time.perf_counter() - start, len(xy), slide.reader)
""",
        "vlm (openslide)": """
from vlm.wsi.slide import open_slide
with open_slide(SLIDE, mpp=0.25, reader="openslide") as slide:
    xy = random_xy(*slide.dimensions)
    start = time.perf_counter()
    for x, y in xy:
        slide.read_region_array((int(x), int(y)), 0, (256, 256))
    done(time.perf_counter() - start, len(xy), slide.reader)
""",
        "hs2p": """
import hs2p
from hs2p.wsi.reader import open_slide
reader = open_slide(SLIDE)
xy = random_xy(*reader.dimensions)
start = time.perf_counter()
for x, y in xy:
    np.asarray(reader.read_region((int(x), int(y)), 0, (256, 256)))[..., :3]
done(time.perf_counter() - start, len(xy), f"{hs2p.__version__} ({reader.backend_name})")
""",
        "lazyslide": """
import lazyslide as zs
wsi = zs.open_wsi(SLIDE)
reader = wsi.reader
xy = random_xy(*wsi.properties.shape[::-1])
start = time.perf_counter()
for x, y in xy:
    np.asarray(reader.get_region(int(x), int(y), 256, 256, level=0))[..., :3]
done(time.perf_counter() - start, len(xy), f"{zs.__version__} ({type(reader).__name__})")
""",
        "fastslide": """
import fastslide
slide = fastslide.FastSlide.from_file_path(SLIDE)
xy = random_xy(*slide.dimensions)
start = time.perf_counter()
for x, y in xy:
    slide.read_region((int(x), int(y)), 0, (256, 256)).numpy()[..., :3]
done(time.perf_counter() - start, len(xy), fastslide.__version__)
""",
    },
}
UNIT = {"tissue + grid": "s", "tile features": "tiles/s", "raw reads": "reads/s"}


def run_child(python: str, code: str, env: dict[str, str], timeout: float) -> dict:
    """One measurement in a fresh process: its JSON line, or {'error': the reason it gave}."""
    try:
        out = subprocess.run([python, "-c", _PRELUDE + textwrap.dedent(code)], env=env, capture_output=True,
                             text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"no result within {timeout:.0f} s"}
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode == 0 and lines:
        return json.loads(lines[-1])
    tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": tail[:300]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers-python", default=None, help="Python of the environment with the peers installed")
    parser.add_argument("--slide", type=Path, default=None, help="a slide to use (default: a generated 0.25-mpp TIFF)")
    parser.add_argument("--size", type=int, default=12_000, help="level-0 side of the generated slide, px")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--reads", type=int, default=400, help="random reads per raw-read case")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the feature cases")
    parser.add_argument("--cases", nargs="+", default=list(CHILDREN), choices=list(CHILDREN))
    parser.add_argument("--timeout", type=float, default=600, help="seconds one measurement may take")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    with tempfile.TemporaryDirectory() as tmp:
        slide = args.slide
        if slide is None:
            sys.path.insert(0, str(VLM_ROOT / "bench"))
            from tiling import blob_region  # bench/tiling.py: the same synthetic tissue

            from vlm.wsi.synthetic import write_pyramidal_tiff

            slide = Path(tmp) / "peers_025.tiff"
            write_pyramidal_tiff(slide, (args.size, args.size), blob_region(args.size), mpp=0.25, n_levels=5)
        env = {**os.environ, "SLIDE": str(slide), "READS": str(args.reads), "THREADS": str(args.threads),
               "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(VLM_ROOT), "OMP_NUM_THREADS": str(args.threads)}
        results: dict[tuple[str, str], list[dict]] = {}
        skipped: dict[tuple[str, str], str] = {}
        for round_ in range(args.rounds):
            for case in args.cases:
                for tool, code in CHILDREN[case].items():
                    if (case, tool) in skipped:
                        continue
                    python = sys.executable if tool.startswith("vlm") else args.peers_python
                    if python is None:
                        skipped[case, tool] = "no --peers-python given"
                        continue
                    row = run_child(python, code, env, args.timeout)
                    if "error" in row:
                        skipped[case, tool] = row["error"]
                        log.info("round %d  %-13s %-16s not run: %s", round_ + 1, case, tool, row["error"])
                        continue
                    results.setdefault((case, tool), []).append(row)
                    log.info("round %d  %-13s %-16s %.2f s, %d, %s", round_ + 1, case, tool, row["seconds"],
                             row["count"], row["version"])
    print_table(results, skipped, args.cases)


def print_table(results: dict[tuple[str, str], list[dict]], skipped: dict[tuple[str, str], str], cases: list[str]):
    """Median of the rounds per (case, tool), and each tool's ratio to vlm's figure of that case."""
    log.info("\n| case | tool (version) | median | vs vlm | peak MB | rounds |\n|---|---|---|---|---|---|")
    for case in cases:
        figures = {}
        for (row_case, tool), rows in results.items():
            if row_case != case:
                continue
            seconds = statistics.median(row["seconds"] for row in rows)
            figures[tool] = (seconds if UNIT[case] == "s" else rows[0]["count"] / seconds, rows)
        base = next((value for tool, (value, _) in figures.items() if tool.startswith("vlm")), None)
        for tool, (value, rows) in figures.items():
            ratio = "" if base is None else f"{(base / value if UNIT[case] == 's' else value / base):.2f}x"
            peak = max(row["peak_mb"] for row in rows)
            shown = f"{value:,.0f}" if value >= 100 else f"{value:.3g}"
            log.info("| %s | %s (%s) | %s %s | %s | %d | %d |", case, tool, rows[0]["version"], shown, UNIT[case],
                     ratio, peak, len(rows))
        for (row_case, tool), why in skipped.items():
            if row_case == case:
                log.info("| %s | %s | not run: %s | | | |", case, tool, why.replace("|", "/"))
    log.info("(vs vlm: the tool's speed as a multiple of vlm's; above 1 = faster than vlm)")


if __name__ == "__main__":
    main()
