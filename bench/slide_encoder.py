"""Benchmark the GigaPath slide encoder (CPU fp32, or `--device cuda`): time and peak memory per case.

Compares `vlm.encoders.longnet.dilated_attention_qkv` (fused attention that returns its log-sum-exp, strided
gathers, running merge of branches) with a straightforward re-implementation written below: per branch,
`scaled_dot_product_attention` for the output plus a separate `logsumexp(q·kᵀ)` for the branch weight,
official-style `diag_embed` scatter and a stack of all branch outputs. Both run inside the same model
(same linear layers), so the difference is the attention. Random weights; timings only, no assertions.

    python bench/slide_encoder.py                      # 10k tiles ours vs baseline, 40k ours
    python bench/slide_encoder.py --tiles 10000 40000 --baseline-tiles 10000 --threads 2
    python bench/slide_encoder.py --device cuda --precision bf16 --tiles 10000 70000   # median of 5 passes
    python bench/slide_encoder.py --tiles 2000 --baseline-tiles --compiled-tiles 2000  # eager vs compiled
    python bench/slide_encoder.py --model tiny --tiles 200 --baseline-tiles 200        # smoke test: tiny preset

Each case runs in a fresh subprocess so that peak RSS (ru_maxrss) is that case's alone.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vlm.encoders.slide import SLIDE_ENCODER_PRESETS

log = logging.getLogger("bench.slide_encoder")


def baseline_dilated_attention(q, k, v, segment_lengths, dilated_ratios):  # [n, H, D] -> [n, H, D]
    """Per-branch SDPA + separately computed lse, combined like the official `scattering`."""
    n, heads, dim = q.shape
    outs, lses = [], []
    for segment, ratio in zip(segment_lengths, dilated_ratios, strict=True):
        s = min(segment, n)
        n_seg = -(-n // s)
        m = -(-s // ratio)
        per_group = -(-heads // ratio)
        padded_heads = per_group * ratio

        def gather(x, s=s, n_seg=n_seg, m=m, ratio=ratio, per_group=per_group, padded_heads=padded_heads):
            x = F.pad(x, (0, 0, 0, padded_heads - heads, 0, n_seg * s - n)).view(n_seg, s, padded_heads, dim)
            x = F.pad(x, (0, 0, 0, 0, 0, m * ratio - s)).view(n_seg, m, ratio, ratio, per_group, dim)
            x = torch.diagonal(x, dim1=2, dim2=3)  # [n_seg, m, per_group, D, r]
            return x.permute(0, 4, 2, 1, 3).reshape(n_seg, padded_heads, m, dim)

        qi, ki, vi = gather(q), gather(k), gather(v)
        out = F.scaled_dot_product_attention(qi, ki, vi)  # [n_seg, Hp, m, D]
        lse = torch.logsumexp((qi @ ki.transpose(-1, -2)) * dim**-0.5, dim=-1)  # [n_seg, Hp, m]
        out = out.view(n_seg, ratio, per_group, m, dim).permute(0, 3, 2, 4, 1)  # [n_seg, m, hg, D, r]
        out = torch.diag_embed(out, dim1=4, dim2=5)  # [n_seg, m, hg, D, r, r]
        out = out.permute(0, 1, 4, 5, 2, 3).reshape(n_seg * m * ratio, padded_heads, dim)[:n, :heads]
        lse = lse.view(n_seg, ratio, per_group, m).permute(0, 3, 2, 1)
        lse = torch.diag_embed(lse, dim1=3, dim2=4).masked_fill_(
            ~torch.eye(ratio, dtype=torch.bool, device=lse.device), -1e8
        )  # [n_seg, m, hg, r, r]
        lse = lse.permute(0, 1, 3, 4, 2).reshape(n_seg * m * ratio, padded_heads)[:n, :heads]
        outs.append(out)
        lses.append(lse)
    weights = torch.softmax(torch.stack(lses), dim=0)  # [branches, n, H]
    return (torch.stack(outs) * weights.unsqueeze(-1)).sum(0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(
    impl: str,
    tiles: int,
    threads: int,
    out_path: Path,
    device: str = "cpu",
    precision: str = "fp32",
    model_name: str = "gigapath",
) -> dict[str, float]:
    """One forward pass of the encoder preset `model_name` on `tiles` random tiles; the child-process side."""
    from vlm.device import autocast
    from vlm.encoders import longnet
    from vlm.encoders.slide import create_slide_encoder

    torch.set_num_threads(threads)
    dev = torch.device(device)
    if impl == "baseline":
        longnet.dilated_attention_qkv = lambda qkv, segments, ratios: baseline_dilated_attention(
            qkv[0], qkv[1], qkv[2], segments, ratios
        )
    torch.manual_seed(0)
    model = create_slide_encoder(model_name).to(dev).eval()
    config = model.config
    if impl == "compiled":
        model.encoder.compile_token_wise()
    generator = torch.Generator().manual_seed(tiles)
    features = torch.randn(1, tiles, config.in_dim, generator=generator)
    cells = torch.randperm(1000 * 1000, generator=generator)[:tiles]
    coords = (torch.stack([cells // 1000, cells % 1000], dim=1) * 256 + 128).double()[None]
    features, coords = features.to(dev), coords.to(dev)
    repeats = 5 if dev.type == "cuda" else 1
    with torch.inference_mode(), autocast(dev, precision):
        start = time.perf_counter()
        model(features[:, :300], coords[:, :300])  # warm-up (and, compiled, the compile)
        model(features, coords)  # warm-up at full length (CUDA kernels, allocator; compiled: past FFN_CHUNK)
        _sync(dev)
        warmup_seconds = time.perf_counter() - start
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        _sync(dev)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            embedding = model(features, coords)
            _sync(dev)
            times.append(time.perf_counter() - start)
        seconds = sorted(times)[len(times) // 2]
        if dev.type == "cuda":
            peak_gb = torch.cuda.max_memory_allocated(dev) / 1024**3
        else:
            peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB
        # The attention alone, on one layer's q/k/v: the part the two implementations differ in.
        head_dim = config.embed_dim // config.num_heads
        qkv = torch.randn(3, tiles + 1, config.num_heads, head_dim, generator=generator).to(dev)
        attention = longnet.dilated_attention_qkv
        attention(qkv[:, :300], config.segment_lengths, config.dilated_ratios)
        _sync(dev)
        start = time.perf_counter()
        attention(qkv, config.segment_lengths, config.dilated_ratios)
        _sync(dev)
        attention_seconds = time.perf_counter() - start
    torch.save(embedding.float().cpu(), out_path)
    return {"seconds": seconds, "peak_rss_gb": peak_gb, "attention_seconds": attention_seconds,
            "warmup_seconds": warmup_seconds}


def spawn(
    impl: str, tiles: int, threads: int, workdir: Path, device: str, precision: str, model: str
) -> dict[str, float]:
    out_path = workdir / f"{impl}-{tiles}.pt"
    command = [
        sys.executable,
        __file__,
        "--child",
        impl,
        str(tiles),
        "--threads",
        str(threads),
        "--out",
        str(out_path),
        "--device",
        device,
        "--precision",
        precision,
        "--model",
        model,
    ]
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    log.info(
        "%-8s %6d tiles: forward %7.3f s, peak memory %.2f GB; attention of one layer alone %.3f s",
        impl, tiles, figures["seconds"], figures["peak_rss_gb"], figures["attention_seconds"],
    )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gigapath", choices=list(SLIDE_ENCODER_PRESETS),
                        help="slide encoder preset (tiny: a smoke test of this script, not a figure)")
    parser.add_argument("--tiles", type=int, nargs="+", default=[10_000, 40_000])
    parser.add_argument("--baseline-tiles", type=int, nargs="*", default=[10_000])
    parser.add_argument(
        "--compiled-tiles", type=int, nargs="*", default=[], help="also time the compiled encoder at these sizes"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (peak memory is then CUDA's allocator peak)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16", "auto"])
    parser.add_argument("--json", type=Path, default=None, help="append result rows (JSON lines) here")
    parser.add_argument("--child", nargs=2, metavar=("IMPL", "TILES"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        figures = run_case(args.child[0], int(args.child[1]), args.threads, args.out, args.device, args.precision,
                           args.model)
        print(json.dumps(figures))  # the parent reads this line
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log.info(
        "torch %s, %d threads, %s %s, %s slide encoder preset, pool=mean",
        torch.__version__,
        args.threads,
        args.device,
        args.precision,
        args.model,
    )
    run = functools.partial(spawn, threads=args.threads, device=args.device, precision=args.precision,
                            model=args.model)
    encoder = "slide encoder" if args.model == "gigapath" else f"slide encoder ({args.model})"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        ours = {}
        for tiles in args.baseline_tiles:  # each comparison back to back, so both see the same machine load
            ours[tiles] = run("ours", tiles, workdir=workdir)
            base = run("baseline", tiles, workdir=workdir)
            if tiles in ours:
                diff = (torch.load(workdir / f"ours-{tiles}.pt") - torch.load(workdir / f"baseline-{tiles}.pt")).abs()
                log.info(
                    "%d tiles: forward time ours/baseline = %.2f, attention time ours/baseline = %.2f, "
                    "RSS ours/baseline = %.2f, max |diff| = %.1e",
                    tiles,
                    ours[tiles]["seconds"] / base["seconds"],
                    ours[tiles]["attention_seconds"] / base["attention_seconds"],
                    ours[tiles]["peak_rss_gb"] / base["peak_rss_gb"],
                    diff.max().item(),
                )
        for tiles in args.compiled_tiles:  # eager vs compile_token_wise, back to back
            if tiles not in ours:
                ours[tiles] = run("ours", tiles, workdir=workdir)
            compiled = run("compiled", tiles, workdir=workdir)
            diff = (torch.load(workdir / f"ours-{tiles}.pt") - torch.load(workdir / f"compiled-{tiles}.pt")).abs()
            log.info(
                "%d tiles: forward time compiled/eager = %.2f (compile + warm-up %.0f s), max |diff| = %.1e",
                tiles, compiled["seconds"] / ours[tiles]["seconds"], compiled["warmup_seconds"], diff.max().item(),
            )
            rows.append(
                {
                    "case": f"{encoder} compiled, {tiles} tiles",
                    "value": round(1 / compiled["seconds"], 2),
                    "unit": "slides/s",
                    "peak_gb": round(compiled["peak_rss_gb"], 2),
                }
            )
        for tiles in args.tiles:
            if tiles not in ours:
                ours[tiles] = run("ours", tiles, workdir=workdir)
            rows.append(
                {
                    "case": f"{encoder}, {tiles} tiles",
                    "value": round(1 / ours[tiles]["seconds"], 2),
                    "unit": "slides/s",
                    "peak_gb": round(ours[tiles]["peak_rss_gb"], 2),
                }
            )
        if len(ours) > 1:
            small, large = min(ours), max(ours)
            log.info(
                "peak RSS %d / %d tiles = %.2f",
                large,
                small,
                ours[large]["peak_rss_gb"] / ours[small]["peak_rss_gb"],
            )
    if args.json:
        label = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
        with open(args.json, "a") as handle:
            for row in rows:
                handle.write(
                    json.dumps({"bench": "slide_encoder", "device": f"{label} {args.precision}", **row}) + "\n"
                )


if __name__ == "__main__":
    main()
