"""Index kinds: the `--kind auto` ladder, memory per vector, faiss factory strings and search knobs.

Choice of `--kind auto` (memory as estimated for the index alone, against 3/4 of the budget;
the kinds and metrics themselves are declared in search.config):
    flat     N <= 50,000 and N*D*4 bytes fit the budget: exact search, nothing to tune
    hnsw     the graph (N * (4D + 2*32*4) bytes) fits the budget: fastest single queries
    ivf      IVF with raw vectors (N * (4D + 8) bytes) fits
    ivfsq    IVF with 8-bit scalar-quantised vectors (N * (D + 8) bytes) fits: 4x smaller,
             trains in seconds, recall close to raw (0.976 where 64-byte PQ gave 0.355 at
             100k x 512: benchmarks/compressed.py)
    ivfpq    otherwise: IVF + product quantisation with as many bytes per vector as fit

Each kind is a faiss factory string, built by `faiss.index_factory(D, string, metric)`:
    flat     Flat
    hnsw     IDMap2,HNSW32,Flat      rows are added out of order (the held-out tuning queries
                                     last, under their own row ids), so ids are mapped
                                     explicitly; efConstruction 80 is set after the factory
    ivf      IVF{nlist},Flat
    ivfsq    IVF{nlist},SQ8
    ivfpq    IVF{nlist},PQ{m}x{nbits}np
                                     `np`: no polysemous training. The factory's plain `PQ`
                                     turns it on (it reorders each codebook for Hamming-distance
                                     filtering, which these searches never use, and costs training
                                     time); the explicit IndexIVFPQ of earlier builds never did.
"""

from __future__ import annotations

import math

import numpy as np

from embedder.errors import ConfigError

INVERTED_LIST_KINDS = ("ivf", "ivfsq", "ivfpq")  # the kinds whose lists can live on disk
HNSW_M = 32  # links per node
HNSW_EF_CONSTRUCTION = 80  # search width while building (faiss's default: 40): a better graph for a slower build


def load_faiss():
    """The faiss module, or an error that says how to install it."""
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - a dependency, but say how to get it
        raise ConfigError("Similarity search needs FAISS: pip install faiss-cpu") from exc
    return faiss


def faiss_metric(metric: str) -> int:
    """Cosine is inner product over vectors normalised by `prepare`."""
    faiss = load_faiss()
    return faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2


def prepare(x: np.ndarray, metric: str) -> np.ndarray:
    """Vectors as the index takes them: contiguous float32, unit length under cosine."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if metric == "cosine":
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        x = x / np.maximum(norms, 1e-12)
    return x


def choose_kind(n: int, dim: int, budget: int) -> tuple[str, str]:
    """(kind, why) for `--kind auto`: the first rung of the ladder whose index fits `budget` bytes."""
    flat = n * dim * 4
    if n <= 50_000 and flat <= budget:
        return "flat", f"{n} vectors ({flat / 2**20:.1f} MiB) are few enough for exact search"
    hnsw = n * (dim * 4 + 2 * HNSW_M * 4)
    if hnsw <= budget:
        return "hnsw", f"{n} vectors: the HNSW graph ({hnsw / 2**20:.0f} MiB) fits the budget ({budget / 2**20:.0f} MiB)"
    ivf = index_bytes("ivf", n, dim)
    if ivf <= budget:
        return "ivf", f"HNSW would need {hnsw / 2**20:.0f} MiB; IVF with raw vectors ({ivf / 2**20:.0f} MiB) fits"
    sq = index_bytes("ivfsq", n, dim)
    if sq <= budget:
        return "ivfsq", (f"raw vectors need {ivf / 2**20:.0f} MiB > budget {budget / 2**20:.0f} MiB; "
                         f"8-bit scalar-quantised ones ({sq / 2**20:.0f} MiB) fit")
    return "ivfpq", (f"raw vectors need {ivf / 2**20:.0f} MiB, 8-bit ones {sq / 2**20:.0f} MiB > budget "
                     f"{budget / 2**20:.0f} MiB: IVF-PQ compresses them further")


def index_bytes(kind: str, n: int, dim: int, pq_m: int = 0) -> int:
    """Memory of an inverted-list index's vectors and ids (the coarse quantizer aside)."""
    return n * ({"ivf": 4 * dim, "ivfsq": dim, "ivfpq": pq_m}[kind] + 8)


def pq_bytes(n: int, dim: int, budget: int) -> int:
    """PQ bytes per vector: the most that fit `budget` among those dividing `dim`."""
    for m in (64, 48, 32, 24, 16, 12, 8, 4):
        if dim % m == 0 and n * (m + 8) <= budget:
            return m
    return next(m for m in (4, 2, 1) if dim % m == 0)


def nlist_for(n: int) -> int:
    """Inverted lists for `n` vectors: the power of two nearest 4 sqrt(n), within 16 .. 65536."""
    return int(min(65536, max(16, 2 ** round(math.log2(4 * math.sqrt(n))))))


def factory_string(kind: str, nlist: int = 0, pq_m: int = 0, pq_nbits: int = 0) -> str:
    """The faiss factory string of a kind (not `auto`) with its sizes."""
    if kind == "flat":
        return "Flat"
    if kind == "hnsw":
        return f"IDMap2,HNSW{HNSW_M},Flat"
    codes = {"ivf": "Flat", "ivfsq": "SQ8", "ivfpq": f"PQ{pq_m}x{pq_nbits}np"}[kind]
    return f"IVF{nlist},{codes}"


def new_index(factory: str, dim: int, metric: str):
    """An empty, untrained index from its factory string."""
    # index_factory returns the concrete class, owning its C++ object: a downcast of it would not
    # own it, and the index would be freed with the temporary.
    index = load_faiss().index_factory(dim, factory, faiss_metric(metric))
    if "HNSW" in factory:
        inner(index).hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    return index


def knob_of(kind: str) -> str | None:
    """The search-time parameter tuned for recall (none for exact search)."""
    return "nprobe" if kind in INVERTED_LIST_KINDS else {"hnsw": "efSearch"}.get(kind)


def knob_values(knob: str | None, nlist: int = 0) -> list[int]:
    """The values tried in order, cheapest first, until recall reaches the target."""
    if knob == "nprobe":
        return [v for v in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if v <= nlist]
    if knob == "efSearch":
        return [16, 32, 64, 128, 256, 512]
    return []


def set_knob(index, knob: str, value: int) -> None:
    faiss = load_faiss()
    if knob == "efSearch":
        inner(index).hnsw.efSearch = value
    else:
        faiss.extract_index_ivf(index).nprobe = value


def inner(index):
    """The index an IDMap wraps (or the index itself)."""
    faiss = load_faiss()
    index = faiss.downcast_index(index)
    return faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
