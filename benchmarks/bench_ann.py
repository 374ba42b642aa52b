"""Approximate nearest-neighbour top-k (`pinfm_hf.retrieval.ItemIndex`) vs exact top-k over a million item vectors.

    python benchmarks/bench_ann.py --output benchmarks/results/ann.json
    python benchmarks/bench_ann.py --num_items 100000 --num_queries 500 --threads 1  # a quick look

Vectors: no exported embeddings of 10^6 items exist here, so the items are synthetic with the structure of trained
scoring embeddings: a Gaussian mixture of `--num_clusters` centres drawn uniformly on the unit sphere, cluster sizes
Zipf-distributed (weight of the r-th cluster ~ r^-`--zipf`), isotropic noise of norm ~`--spread` around the centre
(spread 1: cosine to the own centre ~0.7, ~0.5 between two items of one cluster, ~0 across clusters), then
L2-normalised. Queries (user embeddings) are drawn the same way, so they fall in popular regions as often as items do.

Exact top-k: the faster, at each thread count, of torch `matmul` + `topk` (queries in chunks of `--exact_chunk`) and
FAISS `IndexFlatIP`. ANN: `ItemIndex.build(index_factory=--index_factory)` (auto: [`default_index_factory`]),
searched with `ItemIndex.search` (ids mapped back, as callers get them). Each method runs `--repeats` times,
interleaved after a warm-up, and the best time counts (the machine may be shared). `ann_recall_at_<k>`: the share of
the exact top-k the index returns, averaged over queries. The headline row is the thread count with the lower
speed-up; `by_threads` has every row. `load_average` tells how busy the machine was.

`--candidates` times other indexes in the same loop, against the same exact baseline (`candidates` in the report),
to show why `auto` is what it is:

    python benchmarks/bench_ann.py --threads 1 --candidates "HNSW32|efSearch=128;efSearch=256" \
        "IVF4096,Flat|nprobe=32;nprobe=64" "IVF4096,SQ8|nprobe=48" --output /tmp/ann_candidates.json
"""

import argparse
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from pinfm_hf.retrieval import ItemIndex, import_faiss

from _report import emit  # benchmarks/ is on sys.path when a script runs


def synthetic_vectors(
    rng: np.random.Generator, centres: np.ndarray, weights: np.ndarray, num: int, spread: float
) -> np.ndarray:
    """`num` L2-normalised draws of the mixture: a centre by `weights`, plus isotropic noise of norm ~`spread`."""
    dim = centres.shape[1]
    out = np.empty((num, dim), dtype=np.float32)
    for start in range(0, num, 262_144):  # bounded temporaries
        n = min(262_144, num - start)
        points = centres[rng.choice(len(centres), size=n, p=weights)]
        points += (spread / np.sqrt(dim)) * rng.standard_normal((n, dim), dtype=np.float32)
        out[start : start + n] = points / np.linalg.norm(points, axis=1, keepdims=True)
    return out


def torch_top_k(items: torch.Tensor, queries: np.ndarray, k: int, chunk: int) -> np.ndarray:
    out = []
    for start in range(0, len(queries), chunk):
        scores = torch.from_numpy(queries[start : start + chunk]) @ items.T  # (chunk, num_items)
        out.append(scores.topk(k, dim=1).indices.numpy())
    return np.concatenate(out)


EXACT_METHODS = ("torch matmul+topk", "faiss IndexFlatIP")


def search_with(faiss, index: ItemIndex, parameters, queries: np.ndarray, k: int) -> np.ndarray:
    """A candidate shares its FAISS index between parameter sets: set its own before searching."""
    if parameters:
        faiss.ParameterSpace().set_index_parameters(index.index, parameters)
    return index.search(queries, k)[0]


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(a, b)) / len(b) for a, b in zip(found, exact)]))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_items", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--num_queries", type=int, default=1000)
    parser.add_argument("--num_clusters", type=int, default=2000, help="Mixture centres (item 'topics').")
    parser.add_argument("--zipf", type=float, default=0.8, help="Cluster r has weight ~ r^-zipf.")
    parser.add_argument("--spread", type=float, default=1.0, help="Noise norm around a centre (centre norm: 1).")
    parser.add_argument("--k", type=int, default=100, help="Results per query.")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="Thread counts to time at, each alike.")
    parser.add_argument("--index_factory", default="auto", help="FAISS factory string, or 'auto' (by catalogue size).")
    parser.add_argument("--search_parameters", default=None, help="FAISS search parameters; default: those of 'auto'.")
    parser.add_argument(
        "--candidates", nargs="*", default=[], metavar="FACTORY|PARAMS;PARAMS",
        help="Other indexes to time alike: a FAISS factory string, '|', then ';'-separated search parameter sets.",
    )
    parser.add_argument("--exact_chunk", type=int, default=128, help="Queries per torch matmul of the exact baseline.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None, help="Write the JSON report here.")
    args = parser.parse_args()
    faiss = import_faiss()
    load_before = os.getloadavg()

    # ----- data -----
    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((args.num_clusters, args.dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    weights = 1.0 / np.arange(1, args.num_clusters + 1) ** args.zipf
    weights /= weights.sum()
    items = synthetic_vectors(rng, centres, weights, args.num_items, args.spread)
    queries = synthetic_vectors(rng, centres, weights, args.num_queries, args.spread)
    items_t = torch.from_numpy(items)
    torch.set_num_threads(max(args.threads))
    exact = torch_top_k(items_t, queries, args.k, args.exact_chunk)  # the reference top-k

    # ----- build -----
    start = time.perf_counter()
    index = ItemIndex.build(
        items, index_factory=args.index_factory, search_parameters=args.search_parameters, num_threads=max(args.threads),
        seed=args.seed,
    )
    build_seconds = time.perf_counter() - start
    flat = faiss.IndexFlatIP(args.dim)
    flat.add(items)
    candidates = {}  # name -> (index, search parameters)
    for spec in args.candidates:
        factory, _, parameter_sets = spec.partition("|")
        start = time.perf_counter()
        other = ItemIndex.build(items, index_factory=factory, num_threads=max(args.threads), seed=args.seed)
        seconds = time.perf_counter() - start
        for parameters in parameter_sets.split(";") if parameter_sets else [None]:
            candidates[f"{factory} {parameters or ''}".strip()] = (other, parameters, seconds)

    # ----- time -----
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)
        index.num_threads = threads
        methods = {
            "torch matmul+topk": lambda q: torch_top_k(items_t, q, args.k, args.exact_chunk),
            "faiss IndexFlatIP": lambda q: flat.search(q, args.k)[1],
            "ann": lambda q: index.search(q, args.k)[0],
        }
        for name, (other, parameters, _) in candidates.items():
            other.num_threads = threads
            methods[name] = lambda q, other=other, parameters=parameters: search_with(faiss, other, parameters, q, args.k)
        for method in methods.values():  # warm-up
            method(queries[:64])
        best, found = {name: float("inf") for name in methods}, {}
        for _ in range(args.repeats):
            for name, method in methods.items():
                start = time.perf_counter()
                result = method(queries)
                best[name] = min(best[name], time.perf_counter() - start)
                found[name] = result
        exact_name = min(EXACT_METHODS, key=best.get)
        rows.append({
            "threads": threads,
            f"ann_recall_at_{args.k}": round(recall(found["ann"], exact), 4),
            "ann_speedup": round(best[exact_name] / best["ann"], 2),
            "exact_ms_per_query": round(best[exact_name] / args.num_queries * 1e3, 4),
            "ann_ms_per_query": round(best["ann"] / args.num_queries * 1e3, 4),
            "exact_method": exact_name,
            "exact_ms_per_query_by_method": {
                name: round(best[name] / args.num_queries * 1e3, 4) for name in EXACT_METHODS
            },
            "candidates": {
                name: {
                    f"recall_at_{args.k}": round(recall(found[name], exact), 4),
                    "speedup": round(best[exact_name] / best[name], 2),
                    "ms_per_query": round(best[name] / args.num_queries * 1e3, 4),
                    "build_seconds": round(candidates[name][2], 1),
                }
                for name in candidates
            },
        })
        print(rows[-1], flush=True)

    headline = min(rows, key=lambda row: row["ann_speedup"])
    report = {
        **headline,
        "num_items": args.num_items,
        "dim": args.dim,
        "num_queries": args.num_queries,
        "k": args.k,
        "index": {"factory": index.index_factory, "search_parameters": index.search_parameters},
        "build_seconds": round(build_seconds, 1),
        "build_threads": max(args.threads),
        "vectors": (
            f"synthetic, L2-normalised Gaussian mixture: {args.num_clusters} centres uniform on the unit sphere, Zipf "
            f"cluster sizes (weight ~ rank^-{args.zipf}), isotropic noise of norm ~{args.spread}; queries drawn alike"
        ),
        "timing": f"best of {args.repeats} interleaved runs over all queries at once, after a warm-up",
        "by_threads": rows,
        "headline": "the thread count with the lower ann_speedup",
        "seed": args.seed,
        "load_average": {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in os.getloadavg()]},
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "faiss": faiss.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
    }
    emit(report, args.output)


if __name__ == "__main__":
    main()
