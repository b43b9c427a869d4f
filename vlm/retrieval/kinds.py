"""FAISS index kinds: which one to build for a collection, how to build it, and how to tune it.

Every index holds L2-normalised vectors under inner product (= cosine) and is wrapped in `IndexIDMap2`, so
that the ids FAISS returns are our stable row ids (mapped to slide ids by the metadata table) and any vector
can be read back by id for slide → slide queries.

`auto` picks by collection size:
- n <= 100,000: `flat`, exact; a query scans every vector (a few ms at 100k x 512-d) and nothing is trained;
- n <= 4,000,000: `ivf` (IVF-Flat, nlist = 4·√n), whose vectors stay exact (4·d bytes each, 8 GB at 4M x 512);
- larger: `ivfpq`: IVF (nlist <= 4096, HNSW over the centroids) over product-quantised codes (d/8 bytes a
  vector) for the scan, and the shortlist (`k_factor` x k) re-ranked with 8-bit scalar-quantised vectors
  (d bytes): about 3.5x less memory than ivf (6 GB at 10M x 512).
`hnsw` (graph, M = 32) is available by name: lowest latency, no training, but a slower build and more memory.

Approximate kinds are tuned at build time: the smallest `nprobe` / `efSearch` whose Recall@k against exact
search, on a sample of the collection's own vectors (each query's own entry left out of both lists), reaches
the target. The value is stored in the manifest with the recall it measured.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from typing import Any

import faiss
import numpy as np

from vlm.errors import InputError, UsageError
from vlm.settings import INDEX_KINDS

log = logging.getLogger(__name__)

KINDS = INDEX_KINDS
APPROXIMATE: tuple[str, ...] = ("ivf", "hnsw", "ivfpq")
FLAT_MAX = 100_000
IVF_MAX = 4_000_000
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
TRAIN_POINTS_PER_LIST = 50  # k-means sample per IVF list (FAISS warns below 39)
MIN_PQ_TRAIN = 10_000  # 8-bit PQ codebooks need ~39 x 256 training vectors
IVFPQ_NLIST_MAX = 4096  # k-means cost grows with nlist^2 (its sample is 50 x nlist); lists of ~2,500 at 10M
IVFPQ_K_FACTOR = 16  # shortlist = 16 x k PQ candidates, re-ranked with 8-bit vectors (k=10: 160 decodes, ~20 us)
IVFPQ_COARSE_EF = 64  # HNSW efSearch over the coarse centroids; raised to nprobe when that is larger
TRAIN_SAMPLE = 300_000  # rows `SlideIndex.from_vector_chunks` keeps to train on (600 MB at 512-d)
TUNE_QUERIES = 1000  # collection vectors whose exact neighbours tuning compares against
EF_CANDIDATES = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)


def choose_kind(n: int) -> str:
    """The kind `auto` builds for `n` vectors (thresholds in the module docstring)."""
    if n <= FLAT_MAX:
        return "flat"
    return "ivf" if n <= IVF_MAX else "ivfpq"


def why_kind(n: int) -> str:
    """Why `choose_kind(n)` picks what it picks (logged by builds with `auto`)."""
    if n <= FLAT_MAX:
        return f"{n:,} vectors <= {FLAT_MAX:,}: exact search is fast enough"
    if n <= IVF_MAX:
        return f"{FLAT_MAX:,} < {n:,} vectors <= {IVF_MAX:,}: exact vectors still fit in memory"
    return f"{n:,} vectors > {IVF_MAX:,}: compressed codes (d/8 + d bytes a vector) keep the index in memory"


def default_params(kind: str, n: int, dim: int) -> dict[str, Any]:
    """Build parameters of `kind` for `n` vectors of `dim` (search parameters are set by `tune`)."""
    if kind == "flat":
        return {}
    if kind == "hnsw":
        return {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION, "efSearch": 64}
    if kind in ("ivf", "ivfpq"):
        nlist = max(1, min(round(4 * math.sqrt(n)), n // 39))
        params: dict[str, Any] = {"nlist": nlist, "nprobe": min(8, nlist)}
        if kind == "ivfpq":
            params["nlist"] = min(nlist, IVFPQ_NLIST_MAX)
            params["nprobe"] = min(8, params["nlist"])
            params["m"] = next(m for m in range(max(1, dim // 8), 0, -1) if dim % m == 0)
            params["nbits"] = 8
            params["k_factor"] = IVFPQ_K_FACTOR
        return params
    raise InputError(f"unknown index kind {kind!r}; choose one of {', '.join(KINDS)}")


def create_index(kind: str, dim: int, params: dict[str, Any]) -> faiss.IndexIDMap2:
    """An empty (untrained) index of `kind`, wrapped so that it stores our ids."""
    metric = faiss.METRIC_INNER_PRODUCT
    if kind == "flat":
        base: faiss.Index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        base = faiss.IndexHNSWFlat(dim, int(params["M"]), metric)
        base.hnsw.efConstruction = int(params["efConstruction"])
    elif kind == "ivf":
        base = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, int(params["nlist"]), metric)
    elif kind == "ivfpq":
        coarse = faiss.IndexHNSWFlat(dim, HNSW_M, metric)  # assigns 10M vectors to lists in minutes, not hours
        coarse.hnsw.efSearch = IVFPQ_COARSE_EF
        ivfpq = faiss.IndexIVFPQ(coarse, dim, int(params["nlist"]), int(params["m"]), int(params["nbits"]), metric)
        base = faiss.IndexRefine(ivfpq, faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit, metric))
    else:
        raise InputError(f"unknown index kind {kind!r}; choose one of {', '.join(KINDS[1:])}")
    return faiss.IndexIDMap2(base)  # the FAISS wrapper keeps `base` alive with the map


def train_index(index: faiss.IndexIDMap2, kind: str, vectors: np.ndarray, seed: int = 0) -> None:
    """Train IVF coarse centroids (and PQ codebooks) on a seeded sample; a no-op for flat and HNSW."""
    if kind not in ("ivf", "ivfpq"):
        return
    ivf = faiss.extract_index_ivf(index)
    if kind == "ivfpq" and len(vectors) < MIN_PQ_TRAIN:
        raise UsageError(
            f"ivfpq needs at least {MIN_PQ_TRAIN} vectors to train its codebooks, got {len(vectors)}; "
            "use `kind` flat (exact) for a collection this small"
        )
    ivf.cp.niter = 10  # tuning nprobe afterwards makes up for coarser centroids; saves minutes at 1M
    ivf.cp.seed = seed
    sample = min(len(vectors), max(TRAIN_POINTS_PER_LIST * ivf.nlist, MIN_PQ_TRAIN if kind == "ivfpq" else 0))
    rows = np.sort(np.random.default_rng(seed).choice(len(vectors), size=sample, replace=False))
    exact = faiss.IndexFlatIP(ivf.d)  # referenced here: FAISS does not own its clustering index
    if kind == "ivfpq":
        # k-means assigns with an exact scan (FAISS would otherwise use the HNSW quantizer, rebuilt every
        # iteration), and keeps unit-norm centroids, on which the HNSW graph searches inner product well
        ivf.clustering_index = exact
        ivf.cp.spherical = True
    index.train(np.ascontiguousarray(vectors[rows]))
    ivf.clustering_index = None
    if kind == "ivf":
        ivf.make_direct_map()  # lets `reconstruct(id)` read a vector back (ivfpq reads its 8-bit copy)


def reserve(index: faiss.IndexIDMap2, kind: str, n: int) -> None:
    """Allocate ivfpq's re-ranking codes for `n` vectors before adding them in blocks.

    Those codes are one array (d bytes a vector, 5 GB at 10M x 512) that would otherwise double its capacity as
    blocks arrive, briefly holding old and new copies (+2.6 GB of peak memory at 10M); sizing it once and
    emptying it keeps the capacity, so the adds fill it in place. A no-op for the other kinds.
    """
    if kind != "ivfpq":
        return
    refine = faiss.downcast_index(faiss.downcast_index(index.index).refine_index)
    refine.codes.resize(n * refine.code_size)
    refine.codes.resize(0)


def apply_params(index: faiss.IndexIDMap2, kind: str, params: dict[str, Any]) -> None:
    """Set the search parameters in the index itself, so that plain searches use them.

    Parameters stored in the index are also what `faiss.read_index` users of `index.faiss` get.
    """
    if kind in ("ivf", "ivfpq"):
        ivf = faiss.extract_index_ivf(index)
        ivf.nprobe = int(params["nprobe"])
        if kind == "ivfpq":  # the HNSW coarse quantizer must look at least as far as nprobe lists
            faiss.downcast_index(ivf.quantizer).hnsw.efSearch = max(IVFPQ_COARSE_EF, int(params["nprobe"]))
    if kind == "ivfpq":
        faiss.downcast_index(index.index).k_factor = float(params["k_factor"])
    if kind == "hnsw":
        faiss.downcast_index(index.index).hnsw.efSearch = int(params["efSearch"])


def removal_filter(index: faiss.IndexIDMap2, kind: str, removed: np.ndarray) -> np.ndarray:
    """What a search must skip for the `removed` ids: the ids themselves, or for ivfpq their positions
    (its filter acts inside IndexRefine, on the inner IVF, which never sees our ids)."""
    if kind != "ivfpq" or not len(removed):
        return removed
    return np.flatnonzero(np.isin(faiss.vector_to_array(index.id_map), removed)).astype(np.int64)


def search_params(
    kind: str, params: dict[str, Any], k: int, skip: np.ndarray | None = None
) -> faiss.SearchParameters | None:
    """Per-call parameters, only where the index's own (see `apply_params`) do not do: a filter leaving
    out `skip` (from `removal_filter`), or an HNSW search for more than efSearch results. None otherwise
    (the plain path)."""
    selector = None
    if skip is not None and len(skip):
        selector = faiss.IDSelectorNot(faiss.IDSelectorBatch(skip))
    if selector is None and not (kind == "hnsw" and k > int(params["efSearch"])):
        return None
    if kind == "ivf":
        out = faiss.SearchParametersIVF(nprobe=int(params["nprobe"]), sel=selector)
    elif kind == "ivfpq":
        inner = faiss.SearchParametersIVF(nprobe=int(params["nprobe"]), sel=selector)
        out = faiss.IndexRefineSearchParameters(k_factor=float(params["k_factor"]), base_index_params=inner)
        out.inner = inner
    elif kind == "hnsw":
        out = faiss.SearchParametersHNSW(efSearch=max(k, int(params["efSearch"])), sel=selector)
    else:
        out = faiss.SearchParameters(sel=selector) if selector is not None else None
    if out is not None:
        out.selector = selector  # keep the C++ objects the parameters point to alive during the search
    return out


def topk_without_self(ids: np.ndarray, own: np.ndarray, k: int) -> list[set[int]]:
    """The first k ids of each row other than the query's own id."""
    return [set([i for i in row if i != self_id and i != -1][:k]) for row, self_id in zip(ids, own, strict=True)]


def measure_recall(
    index: faiss.Index,
    kind: str,
    params: dict[str, Any],
    queries: np.ndarray,
    query_ids: np.ndarray,
    exact: list[set[int]],
    k: int,
) -> float:
    """Mean |approximate top-k ∩ exact top-k| / k over the queries (their own entries left out)."""
    apply_params(index, kind, params)
    _, found = index.search(queries, k + 1)
    approx = topk_without_self(found, query_ids, k)
    return float(np.mean([len(a & e) / max(1, len(e)) for a, e in zip(approx, exact, strict=True)]))


def tune(
    index: faiss.Index,
    kind: str,
    params: dict[str, Any],
    vectors: np.ndarray,
    ids: np.ndarray,
    *,
    target: float = 0.95,
    k: int = 10,
    n_queries: int = TUNE_QUERIES,
    seed: int = 0,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Pick the smallest nprobe / efSearch reaching `target` Recall@k vs exact search.

    Queries are a seeded sample of the collection; the exact neighbours come from a brute-force scan of
    `vectors` (no second copy of them). Returns the updated params and a recall record for the manifest.
    """
    check_target(target)
    n = len(vectors)
    if kind not in APPROXIMATE:
        return params, {"exact": True, "measured": 1.0, "k": k}
    rows = np.sort(np.random.default_rng(seed + 1).choice(n, size=min(n_queries, n), replace=False))
    queries = np.ascontiguousarray(vectors[rows])
    _, nearest = faiss.knn(queries, vectors, min(k + 1, n), metric=faiss.METRIC_INNER_PRODUCT)
    exact = topk_without_self(np.where(nearest >= 0, ids[np.clip(nearest, 0, None)], -1), ids[rows], k)
    return tune_on(index, kind, params, queries, ids[rows], exact, target=target, k=k)


def check_target(target: float) -> None:
    if not 0 < target <= 1:
        raise UsageError(f"target recall must be in (0, 1], got {target}")


def tune_on(
    index: faiss.Index,
    kind: str,
    params: dict[str, Any],
    queries: np.ndarray,
    query_ids: np.ndarray,
    exact: list[set[int]],
    *,
    target: float = 0.95,
    k: int = 10,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """`tune` given the queries (indexed vectors, ids `query_ids`) and their exact top-k (own id left out)."""
    if kind not in APPROXIMATE:
        return params, {"exact": True, "measured": 1.0, "k": k}
    name = "efSearch" if kind == "hnsw" else "nprobe"
    if kind == "hnsw":
        candidates = list(EF_CANDIDATES)
    else:
        nlist = int(params["nlist"])
        candidates = sorted({min(2**i, nlist) for i in range(int(math.log2(nlist)) + 2)})
    recall = 0.0
    for value in candidates:
        trial = {**params, name: value}
        recall = measure_recall(index, kind, trial, queries, query_ids, exact, k)
        log.debug("%s %s=%d: Recall@%d %.4f", kind, name, value, k, recall)
        if recall >= target:
            break
    else:
        log.warning(
            "%s did not reach Recall@%d %.2f (best %.4f at %s=%d); searches will miss more neighbours. "
            "Use --kind flat or ivf for exact vectors", kind, k, target, recall, name, value,
        )
    log.info("%s: %s=%d gives Recall@%d %.4f vs exact on %d queries", kind, name, value, k, recall, len(queries))
    record = {"exact": False, "target": target, "measured": recall, "k": k, "n_queries": len(queries),
              "reached": recall >= target, "tuned": name}
    params = {**params, name: value}
    apply_params(index, kind, params)
    return params, record


def merge_topk(
    scores: np.ndarray, ids: np.ndarray, new_scores: np.ndarray, new_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The best `scores.shape[1]` of two [Q, k] inner-product result lists (for exact search over chunks)."""
    all_scores = np.concatenate([scores, new_scores], axis=1)
    all_ids = np.concatenate([ids, new_ids], axis=1)
    order = np.argsort(-all_scores, axis=1, kind="stable")[:, : scores.shape[1]]
    return np.take_along_axis(all_scores, order, axis=1), np.take_along_axis(all_ids, order, axis=1)


@contextlib.contextmanager
def threads_for(n_queries: int) -> Iterator[None]:
    """Use at most one OpenMP thread per query while searching.

    FAISS parallelises a search over its queries, so a single query gains nothing from more threads and
    pays for waking them: on a busy 2-core machine one IVF query took 12 ms with 2 threads, 0.03 ms with 1
    (measured). Batches keep every thread.
    """
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(max(1, min(before, n_queries)))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def to_gpu(index: faiss.Index, kind: str) -> faiss.Index:
    """A GPU copy of `index` for searching (the CPU index stays the one that is edited and saved)."""
    if not hasattr(faiss, "StandardGpuResources"):
        raise ImportError(
            "`gpu` needs FAISS built with GPU support; this faiss is CPU-only. Install it with "
            "`pip install 'vlm[gpu]'` (faiss-gpu) or conda's faiss-gpu, or drop `gpu`"
        )
    if faiss.get_num_gpus() == 0:
        raise UsageError("`gpu`: FAISS sees no CUDA GPU (check CUDA_VISIBLE_DEVICES and drivers), or drop `gpu`")
    if kind not in ("flat", "ivf"):
        raise InputError(
            f"`gpu` supports flat and ivf indexes; FAISS cannot move this {kind} index (hnsw has no GPU version, "
            "ivfpq's re-ranking stage stays on CPU). Rebuild with `kind` ivf, or drop `gpu`"
        )
    resources = faiss.StandardGpuResources()
    gpu = faiss.index_cpu_to_gpu(resources, 0, index)
    gpu.resources = resources  # the GPU index must not outlive its resources
    return gpu
