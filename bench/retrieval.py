"""Benchmark `SlideIndex` kinds against exact `IndexFlatIP` on clustered synthetic embeddings.

    python bench/retrieval.py                       # 1,000,000 x 512-d, kinds auto (= ivf at this size)
    python bench/retrieval.py --n 100000 --kinds auto hnsw ivfpq   # a quicker run, more kinds
    python bench/retrieval.py --n 10000000          # streamed: auto (= ivfpq), never holding the 20 GB of vectors

Above `--stream-over` vectors (default 2,000,000) the collection is never held: it is generated chunk by chunk
(each chunk seeded, so every pass sees the same vectors), indexed with `SlideIndex.from_vector_chunks`, and the
exact top-10 of the held-out queries comes from a brute-force scan of the chunks (no flat index is built). The
index is then saved and dropped, and a fresh process loads it and answers the held-out queries (its peak memory is
what serving the index takes, apart from what the build left in this process). Peak memory (max RSS of this
process) and the machine's load average are reported with the figures.

Prints, per kind: build time (training + adding + recall tuning), index size (bytes of the serialised index,
which is what it takes in memory), Recall@10 vs exact on held-out queries, and latency p50/p99 for single
queries and for batches of 100. The goal at 1M x 512 on 2 cores: R@10 >= 0.95 at <= 1 ms a single query,
>= 30x faster than flat.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: its tests/support generators
from tests.support.models import build_tiny_model  # noqa: E402
from tests.support.synthetic import clustered_embedding_chunks, clustered_embeddings  # noqa: E402
from vlm.retrieval import SlideIndex  # noqa: E402
from vlm.retrieval.kinds import merge_topk, threads_for  # noqa: E402

log = logging.getLogger("bench.retrieval")


def latencies(search, queries: np.ndarray, batch: int, repeats: int, points=(50, 99)) -> tuple[float, ...]:  # noqa: ANN001
    """Percentiles (default p50 / p99) of the wall time (ms) of `search(block)` over `repeats` blocks of `batch`
    queries."""
    times = []
    for r in range(repeats):
        block = queries[(r * batch) % len(queries) :][:batch]
        start = time.perf_counter()
        search(block)
        times.append((time.perf_counter() - start) * 1000)
    return tuple(float(np.percentile(times, point)) for point in points)


def recall_at_10(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean |found top-10 ∩ exact top-10| / 10 over the queries (rows of ids)."""
    return float(np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact, strict=True)]))


def file_size(index: faiss.Index) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        faiss.write_index(index, f"{tmp}/index.faiss")
        return os.path.getsize(f"{tmp}/index.faiss")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="indexed vectors (default 1,000,000)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--kinds", nargs="+", default=["auto"], help="auto, ivf, hnsw, ivfpq (flat always runs)")
    parser.add_argument("--queries", type=int, default=1000, help="held-out queries for recall (default 1000)")
    parser.add_argument("--single", type=int, default=200, help="single queries timed per kind (default 200)")
    parser.add_argument("--batches", type=int, default=20, help="batches of 100 timed per kind (default 20)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="also write the figures as JSON here")
    parser.add_argument("--stream-over", type=int, default=2_000_000, help="stream collections larger than this")
    parser.add_argument("--workdir", help="streamed runs: where to save the index (default: a temporary folder)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    faiss.omp_set_num_threads(args.threads)
    if args.n > args.stream_over:
        streamed(args)
        return

    start = time.perf_counter()
    data = clustered_embeddings(args.n + args.queries, args.dim, n_clusters=args.clusters, seed=0)
    queries, base = data[: args.queries], data[args.queries :]  # held out: never indexed nor used in tuning
    log.info("generated %d x %d in %.0f s", len(data), args.dim, time.perf_counter() - start)

    rows = []
    start = time.perf_counter()
    flat = faiss.IndexFlatIP(args.dim)
    flat.add(base)
    flat_build = time.perf_counter() - start
    _, exact = flat.search(queries, 10)
    with threads_for(1):  # the faster of 1 and all threads, so flat is not handicapped by the thread rule
        flat_single = latencies(lambda q: flat.search(q, 10), queries, 1, min(args.single, 50))
    flat_single = min(flat_single, latencies(lambda q: flat.search(q, 10), queries, 1, min(args.single, 50)))
    flat_batch = latencies(lambda q: flat.search(q, 10), queries, 100, min(args.batches, 5))
    rows.append({"kind": "flat (IndexFlatIP)", "params": {}, "build_s": flat_build, "bytes": file_size(flat),
                 "recall@10": 1.0, "single_ms": flat_single, "batch100_ms": flat_batch})
    log.info("flat: single p50 %.2f ms", flat_single[0])

    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_model(Path(tmp), slide_embed_dim=8, proj_dim=args.dim)
    keys = [f"s{i}" for i in range(len(base))]
    for kind in args.kinds:
        start = time.perf_counter()
        index = SlideIndex.from_vectors(base, keys, model, kind=kind)
        build = time.perf_counter() - start
        _, found = index.search_vectors(queries, 10)
        recall = recall_at_10(found, exact)
        single = latencies(lambda q, index=index: index.search_vectors(q, 10), queries, 1, args.single)
        batch = latencies(lambda q, index=index: index.search_vectors(q, 10), queries, 100, args.batches)
        rows.append({"kind": f"{kind} -> {index.kind}" if kind == "auto" else kind, "params": index.params,
                     "build_s": build, "bytes": file_size(index.index), "recall@10": recall,
                     "tuned_recall@10": index.manifest["recall"]["measured"], "single_ms": single,
                     "batch100_ms": batch})
        del index

    flat_p50 = rows[0]["single_ms"][0]
    print(f"\n{args.n:,} x {args.dim}-d clustered embeddings, {args.threads} threads, faiss {faiss.__version__}")
    print(f"{'kind':18s} {'build s':>8s} {'size MB':>8s} {'R@10':>6s} {'1q p50/p99 ms':>15s} "
          f"{'100q p50/p99 ms':>17s} {'speed-up':>8s}  params")
    for row in rows:
        s50, s99 = row["single_ms"]
        b50, b99 = row["batch100_ms"]
        print(f"{row['kind']:18s} {row['build_s']:8.1f} {row['bytes'] / 2**20:8.0f} {row['recall@10']:6.3f} "
              f"{s50:7.2f}/{s99:<7.2f} {b50:8.1f}/{b99:<8.1f} {flat_p50 / s50:7.0f}x  {row['params']}")
    if args.out:
        Path(args.out).write_text(json.dumps({"n": args.n, "dim": args.dim, "threads": args.threads, "rows": rows},
                                             indent=2) + "\n")


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def streamed(args: argparse.Namespace) -> None:
    """Build, save, load and search an index of `args.n` vectors generated chunk by chunk (see the docstring)."""
    load_before = os.getloadavg()
    chunk = 100_000
    def generate():  # noqa: ANN202  the first `queries` rows are held out: never indexed nor used in tuning
        return clustered_embedding_chunks(args.n + args.queries, args.dim, n_clusters=args.clusters, seed=0,
                                          chunk=max(chunk, args.queries))

    held_out = next(generate())[: args.queries]
    exact_scores = np.full((args.queries, 10), -np.inf, np.float32)
    exact_ids = np.full((args.queries, 10), -1, np.int64)
    passes, exact_done = [], []

    def chunks():  # noqa: ANN202  (vectors, keys) blocks; the first pass also scans them for the exact top-10
        nonlocal exact_scores, exact_ids
        passes.append(time.perf_counter())
        start = 0
        for i, block in enumerate(generate()):
            block = block[args.queries :] if i == 0 else block
            if len(passes) == 1 and not exact_done:
                scores, nearest = faiss.knn(held_out, block, 10, metric=faiss.METRIC_INNER_PRODUCT)
                exact_scores, exact_ids = merge_topk(exact_scores, exact_ids, scores, nearest + start)
            yield block, [f"s{i}" for i in range(start, start + len(block))]
            start += len(block)
        exact_done.append(True)

    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_model(Path(tmp), slide_embed_dim=8, proj_dim=args.dim)
    rows = []
    for kind in args.kinds:
        passes.clear()
        start = time.perf_counter()
        index = SlideIndex.from_vector_chunks(chunks, model, kind=kind)
        build = time.perf_counter() - start
        chosen, params, tuned = index.kind, index.params, index.manifest["recall"]["measured"]
        log.info("built %s (asked for %s) in %.0f s; peak RSS so far %.2f GB", chosen, kind, build, peak_rss_gb())
        with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
            start = time.perf_counter()
            index.save(Path(tmp) / "index")
            save_s = time.perf_counter() - start
            on_disk = sum(f.stat().st_size for f in (Path(tmp) / "index").iterdir() if f.is_file())
            del index
            log.info("saved in %.0f s (%.2f GB); searching it from a fresh process", save_s, on_disk / 1e9)
            served = serve_in_child(Path(tmp), held_out, exact_ids, args)
        rows.append({"kind": f"{kind} -> {chosen}" if kind == "auto" else kind, "params": params, "build_s": build,
                     "save_s": save_s, "bytes": on_disk, "tuned_recall@10": tuned, "peak_rss_gb": peak_rss_gb(),
                     **served})
    load_after = os.getloadavg()
    print(f"\n{args.n:,} x {args.dim}-d clustered embeddings (streamed), faiss {faiss.__version__}, "
          f"{args.threads} threads for batches, 1 for single queries; load average (1/5/15 min) "
          f"{'/'.join(f'{x:.1f}' for x in load_before)} before, {'/'.join(f'{x:.1f}' for x in load_after)} after")
    print("build: building, tuning and saving in this process; served: a fresh process that loads the saved index "
          "and answers the held-out queries (its peak memory is what searching the index needs)")
    print(f"{'kind':18s} {'build s':>8s} {'disk GB':>8s} {'R@10':>6s} {'1q p50/p95/p99 ms':>20s} "
          f"{'100q p50/p95 ms':>17s} {'load s':>6s} {'peak GB build/served':>20s}  params")
    for row in rows:
        s50, s95, s99 = row["single_ms"]
        b50, b95 = row["batch100_ms"]
        print(f"{row['kind']:18s} {row['build_s']:8.0f} {row['bytes'] / 1e9:8.2f} {row['recall@10']:6.3f} "
              f"{s50:6.2f}/{s95:<6.2f}/{s99:<6.2f} {b50:8.1f}/{b95:<8.1f} {row['load_s']:6.0f} "
              f"{row['peak_rss_gb']:9.2f}/{row['served_peak_gb']:<10.2f}  {row['params']}")
    if args.out:
        Path(args.out).write_text(json.dumps({"n": args.n, "dim": args.dim, "threads": args.threads, "rows": rows,
                                              "load_average": [load_before, load_after]}, indent=2) + "\n")


SERVE = """
import json, sys, time
from pathlib import Path
import numpy as np
sys.path.insert(0, sys.argv[1])
from bench.retrieval import latencies, recall_at_10
from vlm.retrieval import SlideIndex
folder, single, batches = Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
queries, exact = np.load(folder / "queries.npy"), np.load(folder / "exact.npy")
start = time.perf_counter()
index = SlideIndex.load(folder / "index")
load_s = time.perf_counter() - start
_, found = index.search_vectors(queries, 10)
recall = recall_at_10(found, exact)
single = latencies(lambda q: index.search_vectors(q, 10), queries, 1, single, (50, 95, 99))
batch = latencies(lambda q: index.search_vectors(q, 10), queries, 100, batches, (50, 95))
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) / 2**20
print(json.dumps({"load_s": load_s, "recall@10": recall, "single_ms": single, "batch100_ms": batch,
                  "served_peak_gb": peak}))
"""


def serve_in_child(folder: Path, queries: np.ndarray, exact: np.ndarray, args: argparse.Namespace) -> dict:
    """Load `folder/index` in a fresh Python and search it with the held-out queries: recall, latencies and the
    peak memory (VmHWM) of a process that only serves the index, apart from what building it left behind."""
    np.save(folder / "queries.npy", queries)
    np.save(folder / "exact.npy", exact)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    argv = [sys.executable, "-c", SERVE, str(Path(__file__).resolve().parents[1]), str(folder), str(args.single),
            str(args.batches)]
    out = subprocess.run(argv, env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"serving the index in a fresh process failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
