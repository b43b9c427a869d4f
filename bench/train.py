"""Benchmark a fine-tuning step: GigaPath slide encoder + BERT text tower, contrastive loss, GradCache.

Random weights and random tile features (no files: this measures the model step, not the feature reader).
One step = `vlm.training.gradcache.contrastive_backward` over a batch of slides of --min-tiles..--max-tiles tiles
(right-padded, as the feature loader pads them), in chunks of --chunk pairs, then an AdamW step — the work
`vlm train --features` does per step. Reports seconds/step, pairs/s and peak memory (CUDA allocator or RSS).

    python bench/train.py                                     # CPU, CI-sized (small slide tower, tiny BERT)
    python bench/train.py --device cuda --full --batch 16 --chunk 4 --min-tiles 3000 --max-tiles 6000 \
        --grad-checkpointing --steps 3                        # LongNet + 12-layer 768-d BERT, bf16
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: its tests/support model builders
from tests.support.models import build_tiny_text_encoder  # noqa: E402
from vlm.device import autocast  # noqa: E402
from vlm.model.clip import create_model  # noqa: E402
from vlm.model.loss import contrastive_loss, create_loss  # noqa: E402
from vlm.training.gradcache import contrastive_backward  # noqa: E402

log = logging.getLogger("bench.train")


def batch_inputs(batch: int, min_tiles: int, max_tiles: int, dim: int, device: torch.device, seed: int):  # noqa: ANN201
    """Right-padded tile features [B, L, D], 0.5-mpp coords [B, L, 2] and padding mask [B, L] (True = pad)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_tiles, max_tiles + 1, (batch,), generator=generator).tolist()
    length = max(lengths)
    features = torch.randn(batch, length, dim, generator=generator)
    coords = torch.zeros(batch, length, 2, dtype=torch.float64)
    mask = torch.ones(batch, length, dtype=torch.bool)
    for row, n in enumerate(lengths):
        cells = torch.randperm(300 * 300, generator=generator)[:n]
        coords[row, :n] = (torch.stack([cells // 300, cells % 300], dim=1) * 256 + 128).double()
        mask[row, :n] = False
    return features.to(device), coords.to(device), mask.to(device), sum(lengths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--full", action="store_true", help="full-size towers (gigapath LongNet, 12-layer BERT)")
    parser.add_argument("--batch", type=int, default=4, help="pairs per contrastive batch")
    parser.add_argument("--chunk", type=int, default=2, help="GradCache chunk (pairs per graph)")
    parser.add_argument("--min-tiles", type=int, default=100)
    parser.add_argument("--max-tiles", type=int, default=200)
    parser.add_argument("--steps", type=int, default=2, help="timed steps (after one warm-up step)")
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="append result rows (JSON lines) here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        size = dict(hidden_size=768, num_layers=12, num_heads=12) if args.full else {}
        text_folder = build_tiny_text_encoder(Path(tmp) / "text", dropout=0.1, **size)
        model = create_model(text_folder, slide_encoder="gigapath" if args.full else "tiny", proj_dim=512,
                             max_length=128)
    model = model.to(device).train()
    if args.grad_checkpointing:
        model.text.set_grad_checkpointing(True)
        model.slide_encoder.set_grad_checkpointing(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    loss_fn = create_loss("clip")
    dim = model.slide_encoder.config.in_dim
    reports = [f"high grade carcinoma with necrosis, case {i}, margins clear" * 4 for i in range(args.batch)]
    times, tiles = [], 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(args.steps + 1):
        features, coords, mask, n_tiles = batch_inputs(args.batch, args.min_tiles, args.max_tiles, dim, device, step)
        tokens = model.text.tokenize(reports, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)

        def encode_slides(rows, features=features, coords=coords, mask=mask):  # noqa: ANN001, ANN202
            rows = list(rows)
            width = int((~mask[rows]).sum(1).max())  # trim the padding this chunk does not need
            with autocast(device, args.precision):
                return model.encode_slides(features[rows, :width], coords[rows, :width], mask[rows, :width])

        def encode_texts(rows, tokens=tokens):  # noqa: ANN001, ANN202
            rows = list(rows)
            with autocast(device, args.precision):
                return model.encode_tokens({key: value[rows] for key, value in tokens.items()})

        def loss_of(slides: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
            return contrastive_loss(loss_fn, slides.float(), texts.float(), model.scale(), model.logit_bias)

        contrastive_backward(encode_slides, encode_texts, args.batch, loss_of, args.chunk)
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step > 0:  # the first step warms up kernels and the allocator
            times.append(time.perf_counter() - start)
            tiles += n_tiles
    seconds = sum(times) / len(times)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 1024**3
        label = torch.cuda.get_device_name(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
        label = "CPU"
    checkpointing = ", grad checkpointing" if args.grad_checkpointing else ""
    log.info("%s, %s towers, batch %d, chunk %d, %d-%d tiles/slide%s: %.2f s/step = %.2f pairs/s, peak %.2f GB",
             label, "full" if args.full else "small", args.batch, args.chunk, args.min_tiles, args.max_tiles,
             checkpointing, seconds, args.batch / seconds, peak)
    if args.json:
        with open(args.json, "a") as handle:
            handle.write(json.dumps({"bench": "train", "device": label, "case": f"train step, batch {args.batch}, "
                                     f"chunk {args.chunk}, {args.min_tiles}-{args.max_tiles} tiles",
                                     "value": round(args.batch / seconds, 2), "unit": "pairs/s",
                                     "peak_gb": round(peak, 2)}) + "\n")


if __name__ == "__main__":
    main()
