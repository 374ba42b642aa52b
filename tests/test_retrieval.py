"""`ItemIndex` (FAISS nearest-neighbour retrieval over item embeddings), the pipeline serving from it, the export flag."""

import ast
import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import pipeline

from pinfm_hf import PINFM_PIPELINE_TASK
from pinfm_hf.embedding_export import export_item_embeddings, export_user_embeddings
from pinfm_hf.retrieval import ItemIndex, default_index_factory
from test_pipeline_pinfm import train_tiny_model, user_events


faiss = pytest.importorskip("faiss")

ROOT = Path(__file__).resolve().parents[1]
EXPORT_SCRIPT = ROOT / "recipes" / "export_embeddings.py"


def clustered(num: int, dim: int, *, num_clusters: int = 40, spread: float = 0.7, seed: int = 0) -> np.ndarray:
    """L2-normalised points around `num_clusters` random centres: the shape of trained item embeddings."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(1234).standard_normal((num_clusters, dim))
    points = centres[rng.integers(0, num_clusters, num)] + spread / np.sqrt(dim) * rng.standard_normal((num, dim))
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


def brute_force(items: np.ndarray, queries: np.ndarray, k: int, exclude=None) -> tuple[np.ndarray, np.ndarray]:
    """Rows and scores of the exact top-k by inner product, `exclude[q]` rows masked."""
    scores = queries @ items.T
    if exclude is not None:
        for row, rows in enumerate(exclude):
            scores[row, list(rows)] = -np.inf
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return top, np.take_along_axis(scores, top, axis=1)


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / len(b) for a, b in zip(found, exact)]))


@pytest.fixture(scope="module")
def small():
    items = np.random.default_rng(0).standard_normal((2000, 16)).astype(np.float32)
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    queries = np.random.default_rng(1).standard_normal((25, 16)).astype(np.float32)
    ids = np.array([f"item-{i}" for i in range(len(items))], dtype=object)
    return items, queries, ids


def test_exact_index_equals_brute_force(small):
    items, queries, ids = small
    index = ItemIndex.build(items, ids.tolist())
    assert index.is_exact and index.index_factory == "Flat" and len(index) == 2000 and index.dim == 16
    found, scores = index.search(queries, 10)
    rows, expected = brute_force(items, queries, 10)
    assert found.shape == scores.shape == (25, 10)
    assert found.tolist() == ids[rows].tolist()
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)
    one, _ = index.search(torch.from_numpy(queries[3]), 10)  # a torch tensor, one query as a vector
    assert one.tolist() == [found[3].tolist()]


def test_auto_index_by_catalogue_size():
    assert default_index_factory(100_000, 64) == ("Flat", None)
    assert default_index_factory(10**6, 64) == ("IVF4096,PQ64x4fs,RFlat", "nprobe=64,k_factor_rf=4")
    assert default_index_factory(200_000, 64) == ("IVF2048,PQ64x4fs,RFlat", "nprobe=128,k_factor_rf=4")
    assert default_index_factory(10**6, 33) == ("IVF4096,Flat", "nprobe=64")  # no fast-scan codes for an odd dim


def test_approximate_index_reaches_high_recall_on_clustered_items():
    items, queries = clustered(6000, 16), clustered(100, 16, seed=1)
    exact, _ = brute_force(items, queries, 50)
    auto = ItemIndex.build(items, exact_threshold=1000, num_threads=1)  # the "auto" approximate index, scaled down
    assert auto.index_factory == "IVF256,PQ16x4fs,RFlat" and auto.search_parameters == "nprobe=256,k_factor_rf=4"
    assert recall(auto.search(queries, 50)[0], exact) >= 0.95
    ann = ItemIndex.build(
        items, index_factory="IVF64,PQ16x4fs,RFlat", search_parameters="nprobe=8,k_factor_rf=4", num_threads=1
    )
    assert not ann.is_exact
    assert recall(ann.search(queries, 50)[0], exact) >= 0.95
    # The search parameters are what buys the recall: one list and no re-ranking miss much of the top-k.
    coarse = ItemIndex(ann.index, ann.ids, index_factory=ann.index_factory, search_parameters="nprobe=1,k_factor_rf=1")
    assert recall(coarse.search(queries, 50)[0], exact) < 0.8


def test_save_and_load_give_the_same_results(small, tmp_path):
    items, queries = clustered(3000, 16), clustered(20, 16, seed=1)
    index = ItemIndex.build(
        items, [f"item-{i}" for i in range(3000)], index_factory="IVF32,PQ16x4fs,RFlat", search_parameters="nprobe=4",
        num_threads=1,
    )
    folder = tmp_path / "ann_index"
    index.save(folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ann_index"]  # no temporary folder left behind
    config = json.loads((folder / "index_config.json").read_text())
    assert config["index_factory"] == "IVF32,PQ16x4fs,RFlat" and config["num_items"] == 3000 and config["dim"] == 16
    loaded = ItemIndex.load(folder, num_threads=1)
    assert repr(loaded) == repr(index)
    assert faiss.extract_index_ivf(loaded.index).nprobe == 4  # search parameters re-applied
    exclude = [[f"item-{i}"] for i in range(20)]
    for a, b in zip(index.search(queries, 30, exclude=exclude), loaded.search(queries, 30, exclude=exclude)):
        np.testing.assert_array_equal(a, b)

    exact = ItemIndex.build(small[0])  # integer ids: the row numbers
    exact.save(folder)  # replaces the folder
    again = ItemIndex.load(folder)
    assert again.ids.dtype == np.int64 and again.is_exact
    np.testing.assert_array_equal(again.search(queries, 5)[0], exact.search(queries, 5)[0])
    with pytest.raises(FileNotFoundError, match="index_config.json"):
        ItemIndex.load(tmp_path / "missing")


def test_exclusion_gives_the_exact_top_k_of_the_remaining_items(small):
    items, queries, ids = small
    index = ItemIndex.build(items, ids.tolist())
    rows, _ = brute_force(items, queries, 10)
    excluded_rows = [set(rows[q, ::2].tolist()) | {q} for q in range(len(queries))]  # half the top-10 and one more
    exclude = [[ids[r] for r in rows_q] + ["not-an-item"] for rows_q in excluded_rows]
    found, scores = index.search(queries, 10, exclude=exclude)
    expected_rows, expected = brute_force(items, queries, 10, exclude=excluded_rows)
    assert found.tolist() == ids[expected_rows].tolist()
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)
    assert not any(set(f) & set(e) for f, e in zip(found.tolist(), exclude))

    found, scores = index.search(queries[:2], 2000, exclude=[ids[:5].tolist(), []])  # more than remain: padded
    assert found[0, -5:].tolist() == [None] * 5 and np.isneginf(scores[0, -5:]).all() and np.isfinite(scores[0, :-5]).all()
    assert None not in found[1].tolist() and sorted(found[1].tolist()) == sorted(ids.tolist())
    by_row = ItemIndex.build(items)
    found, scores = by_row.search(queries[:1], 1999, exclude=[[0, 1]])
    assert found[0, -1] == -1 and np.isneginf(scores[0, -1]) and not {0, 1} & set(found[0].tolist())


def test_bad_inputs_are_refused(small, monkeypatch):
    items, queries, ids = small
    index = ItemIndex.build(items, ids.tolist())
    with pytest.raises(ValueError, match="dimension 8, but the index holds 16-dimensional"):
        index.search(queries[:, :8], 5)
    with pytest.raises(ValueError, match="no items"):
        ItemIndex.build(np.zeros((0, 16), dtype=np.float32))
    with pytest.raises(ValueError, match="one id per embedding"):
        ItemIndex.build(items, ids[:10].tolist())
    with pytest.raises(ValueError, match="unique: 1 duplicate"):
        ItemIndex.build(items[:3], ["a", "b", "a"])
    with pytest.raises(ValueError, match="NaN or infinite"):
        ItemIndex.build(np.full((3, 16), np.nan, dtype=np.float32))
    with pytest.raises(ValueError, match="one collection of ids per query"):
        index.search(queries, 5, exclude=[["item-1"]])
    with pytest.raises(TypeError, match="collection of ids, got the string"):
        index.search(queries[:1], 5, exclude=["item-1"])
    with pytest.raises(ValueError, match="positive integer"):
        index.search(queries, 0)
    monkeypatch.setitem(sys.modules, "faiss", None)  # as if faiss-cpu were not installed
    with pytest.raises(ImportError, match=r"pip install 'pinfm-hf\[retrieval\]'"):
        ItemIndex.build(items)


def test_thread_count_applies_per_call_only(small):
    items, queries, _ = small
    before = faiss.omp_get_max_threads()
    index = ItemIndex.build(items, num_threads=1)
    index.search(queries, 5)
    assert faiss.omp_get_max_threads() == before
    with pytest.raises(ValueError, match="`num_threads` must be positive"):
        ItemIndex.build(items, num_threads=0)


# ----- the recommendation pipeline and the export recipe -----


class SpyIndex:
    """Any object with `search` (and optionally `dim`, `len`) serves the pipeline; this one counts its calls."""

    def __init__(self, index: ItemIndex):
        self.index, self.dim, self.calls = index, index.dim, 0

    def __len__(self) -> int:
        return len(self.index)

    def search(self, queries, k, exclude=None):
        self.calls += 1
        return self.index.search(queries, k, exclude=exclude)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, ml1m_events):
    return train_tiny_model(ml1m_events, tmp_path_factory.mktemp("tiny_pinfm"), steps=4)


@pytest.fixture(scope="module")
def items(tiny):
    return export_item_embeddings(tiny.model, tiny.tokenizer)


@pytest.fixture(scope="module")
def exact_pipeline(tiny):
    return pipeline(PINFM_PIPELINE_TASK, model=tiny.model, tokenizer=tiny.tokenizer, device="cpu")


def assert_same_top_k(got: list[dict], expected: list[dict]) -> None:
    """Equal items and scores; two items whose scores tie within float noise may swap places."""
    assert len(got) == len(expected)
    torch.testing.assert_close([r["score"] for r in got], [r["score"] for r in expected], rtol=1e-5, atol=1e-5)
    for a, b in zip(got, expected):
        assert a["item_id"] == b["item_id"] or abs(a["score"] - b["score"]) <= 1e-5


def test_pipeline_with_an_exact_index_gives_the_exact_top_k(tiny, items, exact_pipeline):
    index = SpyIndex(ItemIndex.from_dataset(items))
    recommend = pipeline(PINFM_PIPELINE_TASK, model=tiny.model, tokenizer=tiny.tokenizer, device="cpu", index=index)
    assert recommend.index is index
    histories = [user_events(tiny.sequences, row) for row in (0, 1)]
    for events in histories:
        history = {e["item_id"] for e in events}
        for exclude_history in (True, False):
            got = recommend(events, top_k=20, exclude_history=exclude_history)
            assert_same_top_k(got, exact_pipeline(events, top_k=20, exclude_history=exclude_history))
            if exclude_history:
                assert not history & {r["item_id"] for r in got}
        top = [r["item_id"] for r in exact_pipeline(events, top_k=5)]
        got = recommend(events, top_k=5, exclude_items=top[:2] + ["never-seen"])
        assert_same_top_k(got, exact_pipeline(events, top_k=5, exclude_items=top[:2]))
        assert not set(top[:2]) & {r["item_id"] for r in got}
    assert index.calls == 2 * 3  # the index answered every call
    batched = recommend(histories, top_k=7, batch_size=2)  # padded together: the exclusions stay per user
    for got, events in zip(batched, histories):
        assert_same_top_k(got, exact_pipeline(events, top_k=7))
    everything = recommend(histories[0], top_k=10**6)  # past the catalogue: every item not in the history
    history = {e["item_id"] for e in histories[0]} & set(items["item_id"])
    assert len(everything) == len(items) - len(history)


def test_pipeline_serves_only_what_the_index_holds(tiny, items, exact_pipeline):
    subset = items.select(range(0, len(items), 2))
    others = items["item_id"][1::2]
    recommend = pipeline(
        PINFM_PIPELINE_TASK, model=tiny.model, tokenizer=tiny.tokenizer, device="cpu",
        index=ItemIndex.from_dataset(subset),
    )
    events = user_events(tiny.sequences, 3)
    got = recommend(events, top_k=10)
    assert {r["item_id"] for r in got} <= set(subset["item_id"])
    assert_same_top_k(got, exact_pipeline(events, top_k=10, exclude_items=others))


def test_pipeline_refuses_an_index_of_another_model(tiny, items):
    def make(index):
        return pipeline(PINFM_PIPELINE_TASK, model=tiny.model, tokenizer=tiny.tokenizer, device="cpu", index=index)

    with pytest.raises(TypeError, match="`search\\(queries, k, exclude\\)`"):
        make(object())
    with pytest.raises(ValueError, match="8-dimensional items but the model's embeddings have 32"):
        make(ItemIndex.build(np.eye(8, dtype=np.float32)))
    embeddings = items.with_format("numpy")["embedding"]
    unknown = make(ItemIndex.build(embeddings, [f"other-{i}" for i in range(len(items))]))
    with pytest.raises(ValueError, match="'other-.*', which this model's tokenizer does not know"):
        unknown(user_events(tiny.sequences, 0), top_k=3)


def test_pipeline_module_stays_remote_code():
    """The pipeline file is copied into saved folders: an index is duck-typed, faiss and pinfm_hf never imported."""
    tree = ast.parse((ROOT / "src" / "pinfm_hf" / "pipeline_pinfm.py").read_text())
    modules = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and not node.level}
    modules |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert {m.split(".")[0] for m in modules} <= {"numbers", "re", "collections", "typing", "torch", "transformers"}


def test_export_script_builds_the_index(tiny, items, shared_data_dir, tmp_path):
    output_dir = tmp_path / "embeddings"
    info = runpy.run_path(str(EXPORT_SCRIPT), run_name="export_embeddings")["main"]([
        "--model", str(tiny.folder), "--data_dir", str(shared_data_dir), "--dataset", "ml-1m",
        "--max_users", "6", "--batch_size", "8", "--output_dir", str(output_dir), "--ann_index", "--ann_threads", "1",
    ])
    assert info["ann_index"] == {"path": "ann_index", "index_factory": "Flat", "search_parameters": None}
    assert "ann_index" in {p.name for p in output_dir.iterdir()} and "ItemIndex.load" in (output_dir / "README.md").read_text()
    index = ItemIndex.load(output_dir / "ann_index")
    users = export_user_embeddings(tiny.model, tiny.tokenizer, tiny.sequences.select(range(6))).with_format("numpy")[:]
    table = items.with_format("numpy")[:]
    found, _ = index.search(users["embedding"], 10)
    rows, _ = brute_force(table["embedding"], users["embedding"], 10)
    assert found.tolist() == np.asarray(items["item_id"], dtype=object)[rows].tolist()
