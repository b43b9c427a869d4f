"""Benchmark `vlm embed-tiles` end to end against the tile encoder alone, in the same run.

Writes a cohort of mixed generated pyramidal TIFFs (JPEG, 0.5 mpp, 3 levels; tissue tile counts spread evenly
between --min-tiles and --max-tiles), tiles them (not timed), then measures on one device:
- `encoder`: the tile encoder alone on random tensors already on the device (the ceiling);
- `stream`: `vlm.tile_features.embed_tiles` over the whole cohort (one tile stream, uint8 tiles, transform on
  the device), outputs written as `vlm embed-tiles` writes them;
- `per-slide` (the old path, kept here as the baseline): one DataLoader per slide, the PIL transform in the
  workers, float32 tiles across processes, a copy back and a synchronisation every batch.
Tiles/s of each, its ratio to the encoder alone, and model FLOP utilisation (FLOPs counted with torch's
FlopCounterMode; peak from --peak-tflops or the card's bf16 dense figure when known).

    python bench/embed_tiles.py                                   # CPU, timm:vit_tiny_patch16_224, CI-sized
    python bench/embed_tiles.py --device cuda --model gigapath --n-slides 12 --min-tiles 500 --max-tiles 4000 \
        --workers 15 --batch-size 128 --json results.jsonl
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import logging
import math
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: its tests/support generators
from tests.support.synthetic import textured_tiles  # noqa: E402
from vlm.device import autocast  # noqa: E402
from vlm.encoders.tile import TileEncoder, create_tile_encoder  # noqa: E402
from vlm.formats.features import read_tile_grid  # noqa: E402
from vlm.settings import READERS  # noqa: E402
from vlm.tile import tile_slides  # noqa: E402
from vlm.tile_features import embed_tiles  # noqa: E402
from vlm.wsi.dataset import TileDataset  # noqa: E402
from vlm.wsi.slide import open_slide  # noqa: E402
from vlm.wsi.synthetic import write_pyramidal_tiff  # noqa: E402
from vlm.wsi.tiling import read_plan  # noqa: E402

log = logging.getLogger("bench.embed_tiles")
TILE = 256
# bf16 dense tensor TFLOP/s by card name (vendor data sheets); used when --peak-tflops is not given
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0}


def write_slide(path: Path, tissue_tiles: int, seed: int) -> None:
    """A slide whose tissue is a rectangle of about `tissue_tiles` 256-px tiles at 0.5 mpp, inside white glass."""
    cols = max(1, round(math.sqrt(tissue_tiles * 1.5)))
    rows = max(1, round(tissue_tiles / cols))
    width, height = (cols + 2) * TILE, (rows + 2) * TILE
    box = (TILE, TILE, (cols + 1) * TILE, (rows + 1) * TILE)
    patterns = list(textured_tiles(8, TILE, seed=seed))

    def region(downsample: int, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        out = np.full((h, w, 3), 245, np.uint8)
        ys = np.arange(y0, y0 + h) * downsample
        xs = np.arange(x0, x0 + w) * downsample
        inside_y = (ys >= box[1]) & (ys < box[3])
        inside_x = (xs >= box[0]) & (xs < box[2])
        if inside_y.any() and inside_x.any():
            pattern = patterns[(y0 // h * 7 + x0 // w) % len(patterns)][:h, :w]
            mask = inside_y[:, None] & inside_x[None, :]
            out[mask] = pattern[mask]
        return out

    write_pyramidal_tiff(path, (width, height), region, mpp=0.5, n_levels=3)


def make_cohort(folder: Path, slides: int, min_tiles: int, max_tiles: int, workers: int = 1) -> list[Path]:
    """Write the cohort (in `workers` processes); slides already in `folder` are reused."""
    folder.mkdir(parents=True, exist_ok=True)
    counts = np.linspace(min_tiles, max_tiles, slides).round().astype(int) if slides > 1 else [max_tiles]
    paths = [folder / f"bench_{index:02d}_{count}.tiff" for index, count in enumerate(counts)]
    todo = [index for index, path in enumerate(paths) if not path.exists()]
    if todo:
        with concurrent.futures.ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
            jobs = [pool.submit(write_slide, paths[i], int(counts[i]), i) for i in todo]
            for job in jobs:
                job.result()
    return paths


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def input_size(encoder: TileEncoder) -> int:
    """The side of the encoder's input images: its transform's crop (224 for gigapath, 160 for timm test_vit)."""
    crop = encoder.transform.transforms[1].size if hasattr(encoder.transform, "transforms") else (224, 224)
    return crop if isinstance(crop, int) else crop[0]


def flops_per_tile(encoder: TileEncoder) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    size = input_size(encoder)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        encoder.to("cpu")(torch.zeros(1, 3, size, size))
    return float(counter.get_total_flops())


@torch.inference_mode()
def encoder_alone(
    encoder: TileEncoder,
    device: torch.device,
    precision: str,
    batch_size: int,
    tiles: int,
    forward: Callable[[torch.Tensor], torch.Tensor],
) -> float:
    """Tiles/s of the encoder on random tensors already on the device (results accumulated on the device)."""
    size = input_size(encoder)
    images = torch.randn(batch_size, 3, size, size, device=device)
    batches = max(2, -(-tiles // batch_size))
    with autocast(device, precision):
        forward(images)  # warm-up (and compilation)
        forward(images)
    sync(device)
    sink = torch.zeros(encoder.output_dim, device=device)
    start = time.perf_counter()
    for _ in range(batches):
        with autocast(device, precision):
            sink += forward(images).float().sum(0)
    sync(device)
    return batches * batch_size / (time.perf_counter() - start)


@torch.inference_mode()
def per_slide_baseline(
    slides: list[Path],
    grids: Path,
    encoder: TileEncoder,
    device: torch.device,
    precision: str,
    batch_size: int,
    workers: int,
) -> int:
    """The former per-slide path: a new DataLoader per slide, float32 tiles from the workers, a sync per batch."""
    total = 0
    for path in slides:
        grid = read_tile_grid(grids / f"{path.stem}.h5")
        with open_slide(path, mpp=grid.mpp) as slide:
            plan = read_plan(slide, grid.tile_size_level0, grid.tile_size)
        dataset = TileDataset(path, grid.coords, plan, grid.mpp, transform=encoder.transform)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda"
        )
        features = np.empty((len(dataset), encoder.output_dim), dtype=np.float32)
        for images, indices in loader:
            with autocast(device, precision):
                output = encoder(images.to(device, non_blocking=True))
            features[indices.numpy()] = output.float().cpu().numpy()
        total += len(dataset)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default=None, help="tile encoder (default: gigapath on CUDA, timm vit_tiny on CPU)")
    parser.add_argument("--n-slides", type=int, default=4, help="synthetic slides to make (without --cohort)")
    parser.add_argument("--min-tiles", type=int, default=40)
    parser.add_argument("--max-tiles", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--compile", action="store_true", help="torch.compile the encoder (stream and alone)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the old per-slide path")
    parser.add_argument("--readers", nargs="+", default=["auto"], choices=READERS,
                        help="time the stream once per pixel reader (vlm.wsi.readers), e.g. openslide tifffile")
    parser.add_argument("--cohort", type=Path, default=None, help="keep the generated slides here (reused)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (bf16 dense)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in the main process (CPU)")
    parser.add_argument("--json", type=Path, default=None, help="append result rows (JSON lines) here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("vlm").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = args.model or ("gigapath" if device.type == "cuda" else "timm:vit_tiny_patch16_224")
    torch.manual_seed(0)
    encoder = create_tile_encoder(model, pretrained=False)
    flops = flops_per_tile(encoder)
    encoder = encoder.to(device).eval()
    peak = args.peak_tflops
    if peak is None and device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((value for key, value in PEAK_BF16_TFLOPS.items() if key in name), None)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        cohort = args.cohort or work / "slides"
        slides = make_cohort(cohort, args.n_slides, args.min_tiles, args.max_tiles, args.workers)
        tile_slides(slides, work / "grids", workers=max(1, args.workers), progress=False)
        n_tiles = sum(len(read_tile_grid(work / "grids" / f"{path.stem}.h5")) for path in slides)
        log.info(
            "cohort: %d slides, %d tissue tiles (%d-%d per slide), written and tiled in %.0f s",
            len(slides),
            n_tiles,
            args.min_tiles,
            args.max_tiles,
            time.perf_counter() - started,
        )
        forward = torch.compile(encoder, dynamic=False) if args.compile else encoder
        alone_tiles = min(n_tiles, 20 * args.batch_size)

        def stream(reader: str) -> int:
            report = embed_tiles(slides, work / "features", encoder, device, args.precision, args.batch_size,
                                 args.workers, tiles_dir=work / "grids", progress=False, compile=args.compile,
                                 overwrite=True, reader=reader)
            if not report.ok:
                raise SystemExit(f"stream failed: {report.failed}")
            return n_tiles

        def old() -> int:
            return per_slide_baseline(slides, work / "grids", encoder, device, args.precision, args.batch_size,
                                      args.workers)

        paths = {("stream" if reader == "auto" else f"stream, {reader}"): functools.partial(stream, reader)
                 for reader in args.readers}
        if not args.no_baseline:
            paths["per-slide (old)"] = old
        rows, ratios, alone = {}, {}, []
        for name, run in paths.items():  # each path right after its own encoder-alone figure: same machine load
            alone.append(encoder_alone(encoder, device, args.precision, args.batch_size, alone_tiles, forward))
            start = time.perf_counter()
            done = run()
            sync(device)
            rows[name] = done / (time.perf_counter() - start)
            ratios[name] = rows[name] / alone[-1]
        rows = {"encoder": float(np.mean(alone)), **rows}
        ratios["encoder"] = 1.0
    label = f"{model} on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}"
    log.info(
        "%s, batch %d, %d workers, precision %s%s, %.1f GFLOP/tile",
        label,
        args.batch_size,
        args.workers,
        args.precision,
        ", compiled" if args.compile else "",
        flops / 1e9,
    )
    log.info("%-18s %10s %9s %6s", "path", "tiles/s", "vs alone", "MFU")
    results = []
    for name, rate in rows.items():
        mfu = rate * flops / (peak * 1e12) if peak else None
        log.info(
            "%-18s %10.1f %8.0f%% %6s",
            name,
            rate,
            100 * ratios[name],
            "n/a" if mfu is None else f"{100 * mfu:.0f}%",
        )
        results.append(
            {
                "bench": "embed_tiles",
                "case": f"tiles: {name}",
                "device": label,
                "value": round(rate, 1),
                "unit": "tiles/s",
                "ratio_to_encoder": round(ratios[name], 3),
                "mfu": None if mfu is None else round(mfu, 3),
                "tiles": n_tiles,
            }
        )
    if args.json:
        with open(args.json, "a") as handle:
            for row in results:
                handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
