"""User and item embedding export on a tiny model trained on real ML-1M users, and the export script."""

import json
import runpy
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from transformers import pipeline

from pinfm_hf import PINFM_PIPELINE_TASK
from pinfm_hf.embedding_export import export_item_embeddings, export_user_embeddings
from test_pipeline_pinfm import train_tiny_model, user_events


# The recipe is run, not imported from: its `main` in this process (the model stays loaded), as `python` would.
EXPORT_SCRIPT = Path(__file__).resolve().parents[1] / "recipes" / "export_embeddings.py"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, ml1m_events):
    return train_tiny_model(ml1m_events, tmp_path_factory.mktemp("tiny_pinfm"))


@pytest.fixture(scope="module")
def items(tiny):
    return export_item_embeddings(tiny.model, tiny.tokenizer)


@pytest.fixture(scope="module")
def users(tiny):
    return export_user_embeddings(tiny.model, tiny.tokenizer, tiny.sequences, batch_size=32)


def as_numpy(dataset: datasets.Dataset) -> dict:
    return dataset.with_format("numpy")[:]


def test_items_are_exactly_the_real_vocabulary(tiny, items):
    tokenizer, model = tiny.tokenizer, tiny.model
    first = model.config.num_special_item_tokens
    assert items["item_id"] == tokenizer.item_tokens[first : tokenizer.first_bucket_id]
    assert len(items) == tokenizer.num_items and len(set(items["item_id"])) == tokenizer.num_items
    assert not any(i.startswith("<") for i in items["item_id"])  # no special token, no hash bucket
    embeddings = torch.from_numpy(as_numpy(items)["embedding"])
    assert embeddings.shape == (tokenizer.num_items, model.config.projection_size) and embeddings.dtype == torch.float32
    with torch.no_grad():
        expected = model.item_embeddings(torch.arange(first, tokenizer.first_bucket_id))
    torch.testing.assert_close(embeddings, expected)
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(len(items)))


def test_user_dot_item_over_temperature_reproduces_the_pipeline(tiny, items, users):
    assert users["user_id"] == tiny.sequences["user_id"]
    user_table, item_table = as_numpy(users), as_numpy(items)
    torch.testing.assert_close(torch.from_numpy(user_table["embedding"]).norm(dim=-1), torch.ones(len(users)))
    column = {item: i for i, item in enumerate(items["item_id"])}
    recommend = pipeline(PINFM_PIPELINE_TASK, model=tiny.model, tokenizer=tiny.tokenizer, device="cpu")
    temperature = tiny.model.temperature.item()
    for row in (0, 1, 57):
        expected = recommend(user_events(tiny.sequences, row), top_k=20, exclude_history=False)
        scores = item_table["embedding"] @ user_table["embedding"][row] / temperature  # (num_items,)
        top = np.argsort(-scores)[:20]
        assert [items["item_id"][i] for i in top] == [r["item_id"] for r in expected]
        got = [float(scores[column[r["item_id"]]]) for r in expected]
        torch.testing.assert_close(got, [r["score"] for r in expected], rtol=1e-4, atol=1e-4)


def test_user_embeddings_do_not_depend_on_batching(tiny, users):
    subset = tiny.sequences.select(range(10, 17))
    again = export_user_embeddings(tiny.model, tiny.tokenizer, subset, batch_size=3)
    assert again["user_id"] == users["user_id"][10:17]
    torch.testing.assert_close(
        torch.from_numpy(as_numpy(again)["embedding"]), torch.from_numpy(as_numpy(users)["embedding"][10:17]),
        rtol=1e-5, atol=1e-5,
    )


def test_export_script_writes_parquet_and_temperature(tiny, items, shared_data_dir, tmp_path):
    output_dir = tmp_path / "embeddings"
    info = runpy.run_path(str(EXPORT_SCRIPT), run_name="export_embeddings")["main"]([
        "--model", str(tiny.folder), "--data_dir", str(shared_data_dir), "--dataset", "ml-1m",
        "--max_users", "25", "--batch_size", "8", "--output_dir", str(output_dir),
    ])
    assert sorted(p.name for p in output_dir.iterdir()) == [
        "README.md", "embedding_info.json", "item_embeddings.parquet", "user_embeddings.parquet",
    ]  # no temporary file left behind
    saved_info = json.loads((output_dir / "embedding_info.json").read_text())
    assert saved_info == json.loads(json.dumps(info))
    assert saved_info["temperature"] == pytest.approx(tiny.model.temperature.item())
    assert "dot(user_embedding, item_embedding) / temperature" in (output_dir / "README.md").read_text()

    saved_items = datasets.Dataset.from_parquet(str(output_dir / "item_embeddings.parquet"))
    assert saved_items["item_id"] == items["item_id"]
    np.testing.assert_allclose(as_numpy(saved_items)["embedding"], as_numpy(items)["embedding"], rtol=1e-5, atol=1e-6)
    saved_users = datasets.Dataset.from_parquet(str(output_dir / "user_embeddings.parquet"))
    assert len(saved_users) == saved_info["num_users"] == 25
    assert as_numpy(saved_users)["embedding"].shape == (25, tiny.model.config.projection_size)


def test_packed_and_padded_user_embeddings_agree(tiny, users):
    padded = export_user_embeddings(tiny.model, tiny.tokenizer, tiny.sequences.select(range(40)), batch_size=16, packing=False)
    torch.testing.assert_close(
        torch.tensor(padded["embedding"]), torch.tensor(users["embedding"][:40]), atol=1e-5, rtol=0
    )


def test_a_vocabulary_free_model_is_refused_by_the_export_and_the_pipeline():
    # Both rank a vocabulary's items: a model whose tokenizer keeps none must say so, not return nothing.
    from transformers import pipeline

    from pinfm_hf import PinFMConfig, PinFMForPretraining, PinFMTokenizer
    from pinfm_hf.embedding_export import export_item_embeddings

    tokenizer = PinFMTokenizer(items=[], actions=["click"], num_hash_buckets=64)
    config = PinFMConfig(item_vocab_size=len(tokenizer), action_vocab_size=tokenizer.action_vocab_size, hidden_size=16,
                         num_hidden_layers=1, num_attention_heads=2, num_item_hash_tables=2, item_hash_table_size=7)
    model = PinFMForPretraining(config)
    with pytest.raises(ValueError, match="vocabulary-free"):
        export_item_embeddings(model, tokenizer)
    with pytest.raises(ValueError, match="vocabulary-free"):
        pipeline("pinfm-recommendation", model=model, tokenizer=tokenizer)
