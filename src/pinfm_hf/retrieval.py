"""Approximate nearest-neighbour retrieval over exported item embeddings, with FAISS (`pip install 'pinfm-hf[retrieval]'`).

The model scores an item by `dot(query, item) / temperature` with both vectors L2-normalised and a positive temperature,
so maximum inner product search returns the model's top-k. Scoring every item costs `num_items * dim` per query; at
millions of items an inverted-file index that scans a few lists of compressed codes and re-ranks the best candidates
exactly returns 97% of the exact top-100 over 40x faster (`benchmarks/results/ann.json`, 10^6 items). Small
catalogues get an exact index: brute force is fast there and loses nothing.

```python
from pinfm_hf.embedding_export import export_item_embeddings
from pinfm_hf.retrieval import ItemIndex

index = ItemIndex.from_dataset(export_item_embeddings(model, tokenizer))  # keyed by raw item id
ids, scores = index.search(user_embeddings, k=100, exclude=[history_a, history_b])  # best first
index.save("outputs/embeddings/ann_index")
recommend = pipeline("pinfm-recommendation", model=folder, index=ItemIndex.load("outputs/embeddings/ann_index"))
```

faiss is imported on first use only, so `pinfm_hf` works without it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .io_utils import PathLike, atomic_folder, atomic_write_json, read_json


INDEX_FILE = "index.faiss"
IDS_FILE = "item_ids.parquet"
CONFIG_FILE = "index_config.json"
FORMAT = "pinfm-item-index"
FORMAT_VERSION = 1
# Below this many items brute force is cheap (~0.5 ms per query at d=64 on one core) and exact.
DEFAULT_EXACT_THRESHOLD = 100_000
# Codes scanned per query by the "auto" inverted file (nprobe lists of num_items / nlist codes each).
SCANNED_CANDIDATES = 16384
# Candidates re-ranked exactly per result (`k_factor_rf`): 4 * k recovers what 4-bit codes mis-order.
DEFAULT_REFINE_FACTOR = 4


def import_faiss():
    """faiss, or an `ImportError` that names the extra to install."""
    try:
        import faiss
    except ImportError as error:
        raise ImportError(
            "Approximate nearest-neighbour retrieval needs FAISS: `pip install 'pinfm-hf[retrieval]'` (faiss-cpu)."
        ) from error
    return faiss


@contextmanager
def _omp_threads(faiss, num_threads: Optional[int]) -> Iterator[None]:
    """FAISS's thread count is process-wide: set it for one call and restore it, so other users of faiss keep theirs."""
    if num_threads is None:
        yield
        return
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(num_threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def default_index_factory(num_items: int, dim: int, exact_threshold: int = DEFAULT_EXACT_THRESHOLD) -> tuple[str, Optional[str]]:
    """
    The FAISS factory string and search parameters `ItemIndex.build(index_factory="auto")` uses.

    Up to `exact_threshold` items: `"Flat"` (exact). Above: `IVF{nlist},PQ{dim}x4fs,RFlat`, an inverted file of
    `nlist ~ 4 sqrt(num_items)` lists holding 4-bit-per-dimension fast-scan codes; the `nprobe` lists nearest to a
    query, about `SCANNED_CANDIDATES` codes, are scanned and the best `4 k` candidates re-ranked with the exact vectors.
    Chosen by measurement at 10^6 clustered items, d=64, one thread (`benchmarks/results/ann.json`): recall@100 0.972 at
    46x the speed of exact top-100, where IVF-Flat needs nprobe 64 for 0.977 at 19x and HNSW32 reaches 0.942 at 12x
    (efSearch 256); the same candidate count gave recall@100 0.97 at 2 10^5 items (nprobe 128 of 2048). An odd `dim`
    (no 2-value fast-scan blocks) gets IVF-Flat.
    """
    if num_items <= exact_threshold:
        return "Flat", None
    nlist = 2 ** round(math.log2(4 * math.sqrt(num_items)))
    # Smaller lists (smaller catalogues) hold fewer of the top-k each: probe enough of them for a fixed candidate count.
    nprobe = min(nlist, max(32, 2 ** round(math.log2(SCANNED_CANDIDATES * nlist / num_items))))
    if dim % 2:
        return f"IVF{nlist},Flat", f"nprobe={nprobe}"
    return f"IVF{nlist},PQ{dim}x4fs,RFlat", f"nprobe={nprobe},k_factor_rf={DEFAULT_REFINE_FACTOR}"


def _as_matrix(values: Any, name: str) -> np.ndarray:
    """A C-contiguous float32 `(n, dim)` array from a numpy array, a torch tensor or nested lists."""
    if hasattr(values, "detach"):  # a torch tensor, without importing torch here
        values = values.detach().float().cpu().numpy()
    array = np.ascontiguousarray(np.asarray(values, dtype=np.float32))
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2:
        raise ValueError(f"`{name}` must be a (num_vectors, dim) array, got shape {array.shape}.")
    if not np.isfinite(array).all():
        raise ValueError(f"`{name}` holds NaN or infinite values.")
    return array


def _as_ids(ids: Any, num_items: int) -> np.ndarray:
    """Item ids as an int64 array (integer ids) or an object array (strings, kept as Python objects)."""
    if ids is None:
        return np.arange(num_items, dtype=np.int64)
    if isinstance(ids, (pa.Array, pa.ChunkedArray)):
        ids = ids.to_pylist()
    array = np.asarray(ids)
    if array.ndim != 1 or len(array) != num_items:
        raise ValueError(f"`ids` must hold one id per embedding ({num_items}), got shape {array.shape}.")
    if array.dtype.kind in "iu":
        return array.astype(np.int64)
    if array.dtype.kind == "b" or array.dtype.kind == "f":
        raise TypeError(f"Item ids must be integers or strings, got {array.dtype}.")
    objects = np.empty(num_items, dtype=object)
    objects[:] = [str(i) if isinstance(i, np.str_) else i for i in array.tolist()]
    return objects


class ItemIndex:
    """
    A maximum-inner-product index over item embeddings that returns item ids: exact (`IndexFlatIP`) or approximate
    (any FAISS factory string, by default chosen by catalogue size: [`default_index_factory`]).

    Build it with [`ItemIndex.build`] or [`ItemIndex.from_dataset`], query it with [`ItemIndex.search`], keep it with
    [`ItemIndex.save`] / [`ItemIndex.load`]. The recommendation pipeline takes one as `index=`.

    Args:
        index (`faiss.Index`): a trained and filled FAISS index with inner-product metric.
        ids (`np.ndarray`): the id of the item at each position of `index` (int64 or strings).
        index_factory (`str`): the FAISS factory string it was built from (for the record and `save`).
        search_parameters (`str`, *optional*): FAISS `ParameterSpace` settings, e.g. `"nprobe=64,k_factor_rf=4"`.
        num_threads (`int`, *optional*): OpenMP threads for building and searching; defaults to faiss's own setting.
    """

    def __init__(
        self,
        index: Any,
        ids: np.ndarray,
        *,
        index_factory: str,
        search_parameters: Optional[str] = None,
        num_threads: Optional[int] = None,
    ):
        self._faiss = import_faiss()
        if index.ntotal != len(ids):
            raise ValueError(f"The FAISS index holds {index.ntotal} vectors but {len(ids)} ids were given.")
        if index.metric_type != self._faiss.METRIC_INNER_PRODUCT:
            raise ValueError("The FAISS index must use the inner-product metric (`faiss.METRIC_INNER_PRODUCT`).")
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"`num_threads` must be positive, got {num_threads}.")
        self.index = index
        self.ids = ids
        self.index_factory = index_factory
        self.search_parameters = search_parameters
        self.num_threads = num_threads
        self._positions: Optional[dict] = None
        if search_parameters:
            self._faiss.ParameterSpace().set_index_parameters(index, search_parameters)

    # ----- building -----

    @classmethod
    def build(
        cls,
        embeddings: Any,
        ids: Optional[Union[Sequence, np.ndarray]] = None,
        *,
        index_factory: str = "auto",
        search_parameters: Optional[str] = None,
        exact_threshold: int = DEFAULT_EXACT_THRESHOLD,
        num_threads: Optional[int] = None,
        max_training_points: Optional[int] = None,
        seed: int = 0,
    ) -> ItemIndex:
        """
        Index `embeddings` for maximum inner product search.

        Args:
            embeddings (`np.ndarray` or `torch.Tensor` of shape `(num_items, dim)`):
                Item vectors, L2-normalised as the model's scoring embeddings are (graph and quantised indexes are
                tuned for that; exact search does not care).
            ids (`Sequence[str | int]`, *optional*):
                The item id of each row (unique), returned by `search`; defaults to the row numbers.
            index_factory (`str`, *optional*, defaults to `"auto"`):
                A FAISS factory string (`"Flat"`, `"HNSW32"`, `"IVF4096,PQ64x4fs,RFlat"`, ...), or `"auto"`: exact up to
                `exact_threshold` items, else the inverted file of [`default_index_factory`].
            search_parameters (`str`, *optional*):
                FAISS `ParameterSpace` settings applied at every search (`"nprobe=64,k_factor_rf=4"`, `"efSearch=256"`);
                with `"auto"` the defaults of [`default_index_factory`].
            exact_threshold (`int`, *optional*, defaults to 100000): the largest catalogue `"auto"` searches exactly.
            num_threads (`int`, *optional*): OpenMP threads for training, adding and searching.
            max_training_points (`int`, *optional*):
                Rows sampled to train a quantiser; defaults to 64 per inverted list (all rows when fewer).
            seed (`int`, *optional*, defaults to 0): seed of that sample.
        """
        faiss = import_faiss()
        vectors = _as_matrix(embeddings, "embeddings")
        num_items, dim = vectors.shape
        if num_items == 0:
            raise ValueError("Cannot build an index of no items: `embeddings` is empty.")
        item_ids = _as_ids(ids, num_items)
        positions = {item: i for i, item in enumerate(item_ids.tolist())}
        if len(positions) != num_items:
            raise ValueError(f"`ids` must be unique: {num_items - len(positions)} duplicate(s).")
        if index_factory == "auto":
            index_factory, auto_parameters = default_index_factory(num_items, dim, exact_threshold)
            search_parameters = search_parameters if search_parameters is not None else auto_parameters
        with _omp_threads(faiss, num_threads):
            index = faiss.index_factory(dim, index_factory, faiss.METRIC_INNER_PRODUCT)
            if not index.is_trained:
                nlist = getattr(_inverted_file(faiss, index), "nlist", 256)
                sample = min(num_items, max_training_points or 64 * nlist)
                rows = np.sort(np.random.default_rng(seed).choice(num_items, size=sample, replace=False))
                index.train(vectors[rows])
            index.add(vectors)
        item_index = cls(
            index, item_ids, index_factory=index_factory, search_parameters=search_parameters, num_threads=num_threads
        )
        item_index._positions = positions
        return item_index

    @classmethod
    def from_dataset(
        cls, dataset: Any, id_column: str = "item_id", embedding_column: str = "embedding", **kwargs: Any
    ) -> ItemIndex:
        """
        Index an exported embedding table: the `datasets.Dataset` of
        [`~pinfm_hf.embedding_export.export_item_embeddings`] (or its Parquet file read back) or a `pyarrow.Table`.
        `kwargs` go to [`ItemIndex.build`].
        """
        table = dataset.with_format("arrow")[:] if hasattr(dataset, "with_format") else dataset
        for column in (id_column, embedding_column):
            if column not in table.column_names:
                raise ValueError(f"The table has no `{column}` column; it has {table.column_names}.")
        embeddings = table.column(embedding_column).combine_chunks()
        if len(embeddings) == 0:
            raise ValueError("Cannot build an index of no items: the table is empty.")
        values = embeddings.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
        return cls.build(values.reshape(len(embeddings), -1), table.column(id_column), **kwargs)

    # ----- searching -----

    @property
    def dim(self) -> int:
        return self.index.d

    def __len__(self) -> int:
        return self.index.ntotal

    @property
    def is_exact(self) -> bool:
        return self.index_factory == "Flat"

    def __repr__(self) -> str:
        params = f", {self.search_parameters}" if self.search_parameters else ""
        return f"ItemIndex({len(self)} items, dim={self.dim}, {self.index_factory}{params})"

    @property
    def positions(self) -> dict:
        """Item id -> row of the index (built on first use after `load`)."""
        if self._positions is None:
            self._positions = {item: i for i, item in enumerate(self.ids.tolist())}
        return self._positions

    def search(
        self, queries: Any, k: int, exclude: Optional[Sequence[Iterable]] = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """
        The `k` items of highest inner product with each query, best first.

        Args:
            queries (`np.ndarray` or `torch.Tensor` of shape `(num_queries, dim)` or `(dim,)`): query embeddings.
            k (`int`): results per query.
            exclude (`Sequence[Iterable]`, *optional*):
                One collection of item ids per query never to return (e.g. the user's history). The index is asked for
                `k` more results than the longest of them, then they are filtered out: an exact index still gives the
                exact top-k of the remaining items. Ids the index does not hold are ignored.

        Returns:
            `(ids, scores)`, each `(num_queries, k)`: item ids (dtype of the index's ids) and inner products (float32).
            Where fewer than `k` items remain, the tail holds id `-1` (integer ids) or `None` and score `-inf`.
        """
        vectors = _as_matrix(queries, "queries")
        if vectors.shape[1] != self.dim:
            raise ValueError(f"Queries have dimension {vectors.shape[1]}, but the index holds {self.dim}-dimensional items.")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"`k` must be a positive integer, got {k!r}.")
        num_queries = len(vectors)
        excluded = self._excluded_positions(exclude, num_queries)
        fetch = min(k + max((len(e) for e in excluded), default=0), len(self))
        with _omp_threads(self._faiss, self.num_threads):
            scores, labels = self.index.search(vectors, fetch)
        out_labels = np.full((num_queries, k), -1, dtype=np.int64)
        out_scores = np.full((num_queries, k), -np.inf, dtype=np.float32)
        for row, removed in enumerate(excluded):
            keep = labels[row] >= 0
            if removed:
                keep &= ~np.isin(labels[row], np.fromiter(removed, dtype=np.int64, count=len(removed)))
            kept = np.flatnonzero(keep)[:k]
            out_labels[row, : len(kept)] = labels[row, kept]
            out_scores[row, : len(kept)] = scores[row, kept]
        return self._ids_at(out_labels), out_scores

    def _excluded_positions(self, exclude: Optional[Sequence[Iterable]], num_queries: int) -> list[set]:
        if exclude is None:
            return [set()] * num_queries
        if isinstance(exclude, (str, bytes)) or len(exclude) != num_queries:
            raise ValueError(f"`exclude` must hold one collection of ids per query ({num_queries}).")
        positions = self.positions
        out = []
        for row in exclude:
            if isinstance(row, (str, bytes)):
                raise TypeError(f"Each entry of `exclude` is a collection of ids, got the string {row!r}.")
            out.append({positions[item] for item in row if item in positions})
        return out

    def _ids_at(self, labels: np.ndarray) -> np.ndarray:
        found = labels >= 0
        if self.ids.dtype == np.int64:
            return np.where(found, self.ids[np.where(found, labels, 0)], -1)
        out = np.full(labels.shape, None, dtype=object)
        out[found] = self.ids[labels[found]]
        return out

    # ----- saving -----

    def save(self, folder: PathLike) -> Path:
        """Write the index, its ids and settings to `folder`, atomically (a crash leaves the previous folder or none)."""
        with atomic_folder(folder) as tmp:
            self._faiss.write_index(self.index, str(tmp / INDEX_FILE))
            pq.write_table(pa.table({"id": pa.array(self.ids.tolist())}), tmp / IDS_FILE)
            atomic_write_json(
                tmp / CONFIG_FILE,
                {
                    "format": FORMAT,
                    "format_version": FORMAT_VERSION,
                    "index_factory": self.index_factory,
                    "search_parameters": self.search_parameters,
                    "metric": "inner_product",
                    "dim": self.dim,
                    "num_items": len(self),
                    "faiss_version": self._faiss.__version__,
                },
            )
        return Path(folder)

    @classmethod
    def load(cls, folder: PathLike, num_threads: Optional[int] = None) -> ItemIndex:
        """An index saved with [`ItemIndex.save`]."""
        faiss = import_faiss()
        folder = Path(folder)
        if not (folder / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{folder} holds no saved ItemIndex ({CONFIG_FILE} is missing).")
        config = read_json(folder / CONFIG_FILE)
        if config.get("format") != FORMAT or config.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(f"{folder / CONFIG_FILE} is not a version-{FORMAT_VERSION} {FORMAT} config: {config}.")
        index = faiss.read_index(str(folder / INDEX_FILE))
        ids = pq.read_table(folder / IDS_FILE).column("id").to_numpy(zero_copy_only=False)
        if index.d != config["dim"] or index.ntotal != config["num_items"]:
            raise ValueError(
                f"{folder}: the FAISS index holds {index.ntotal} vectors of dimension {index.d}, the config says "
                f"{config['num_items']} of dimension {config['dim']}."
            )
        return cls(
            index,
            ids.astype(np.int64) if ids.dtype.kind in "iu" else ids.astype(object),
            index_factory=config["index_factory"],
            search_parameters=config.get("search_parameters"),
            num_threads=num_threads,
        )


def _inverted_file(faiss, index: Any) -> Optional[Any]:
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:  # not an inverted file (e.g. HNSW, PQ alone)
        return None


__all__ = ["DEFAULT_EXACT_THRESHOLD", "ItemIndex", "default_index_factory", "import_faiss"]
