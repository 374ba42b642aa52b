import subprocess
import sys

import pyarrow as pa
import pytest
import torch
from transformers import AutoTokenizer

from pinfm_hf import PinFMTokenizer
from pinfm_hf.tokenization_pinfm import CANDIDATE_ACTION_ID, stable_bucket


def small_events() -> pa.Table:
    return pa.table(
        {
            "user_id": ["u1", "u1", "u1", "u2", "u2", "u3"],
            "item_id": ["Toy Story (1995)", "b", "Toy Story (1995)", "b", "Toy Story (1995)", "c"],
            "action": ["click", "buy", "click", "click", "view", "click"],
            "timestamp": [1, 2, 3, 1, 2, 5],
        }
    )


@pytest.fixture
def tokenizer() -> PinFMTokenizer:
    return PinFMTokenizer.from_events(small_events(), num_hash_buckets=8, model_max_length=3)


def test_vocabulary_layout(tokenizer):
    # specials, then items by descending count (ties by id), then buckets
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3]) == ["<pad>", "<unk>", "<mask>", "<cand>"]
    assert tokenizer.convert_ids_to_tokens([4, 5, 6]) == ["Toy Story (1995)", "b", "c"]
    assert tokenizer.vocab_size == len(tokenizer) == 4 + 3 + 8
    assert tokenizer.first_bucket_id == 7
    assert tokenizer.pad_token_id == 0
    assert tokenizer.action_tokens == ["<pad>", "<cand>", "buy", "click", "view"]
    assert tokenizer.candidate_action_id == CANDIDATE_ACTION_ID == 1


def test_min_count_and_max_vocab_size():
    tok = PinFMTokenizer.from_events(small_events(), min_count=2, num_hash_buckets=4)
    assert tok.num_items == 2 and "c" not in tok.get_vocab()
    tok = PinFMTokenizer.from_events(small_events(), max_vocab_size=1, num_hash_buckets=4)
    assert tok.num_items == 1 and tok.convert_ids_to_tokens(4) == "Toy Story (1995)"


def test_unseen_items_get_stable_hash_buckets(tokenizer):
    fresh = tokenizer.convert_tokens_to_ids("brand-new item")
    assert fresh == tokenizer.first_bucket_id + stable_bucket("brand-new item", 8)
    assert tokenizer.first_bucket_id <= fresh < tokenizer.vocab_size
    # Same bucket in a fresh interpreter (Python's hash() would differ per process).
    code = "from pinfm_hf.tokenization_pinfm import stable_bucket; print(stable_bucket('brand-new item', 8))"
    other_process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(other_process.stdout) == fresh - tokenizer.first_bucket_id
    no_buckets = PinFMTokenizer(items=["a"], actions=["x"], num_hash_buckets=0)
    assert no_buckets.convert_tokens_to_ids("zzz") == no_buckets.unk_token_id


def test_encode_events_keeps_most_recent(tokenizer):
    enc = tokenizer.encode_events(
        ["b", "c", "Toy Story (1995)", "new"], actions=["buy", "click", "view", "click"], timestamps=[1, 2, 3, 4]
    )
    assert enc["input_ids"] == [6, 4, tokenizer.convert_tokens_to_ids("new")]
    assert enc["action_ids"] == [3, 4, 3]
    assert enc["timestamps"] == [2, 3, 4]
    assert enc["attention_mask"] == [1, 1, 1]
    tensors = tokenizer.encode_events(["b"], actions=["buy"], timestamps=[1], return_tensors="pt")
    assert tensors["input_ids"].shape == (1, 1)


def test_encode_events_errors(tokenizer):
    with pytest.raises(ValueError, match="Unknown action 'like'"):
        tokenizer.encode_events(["b"], actions=["like"])
    with pytest.raises(ValueError, match="`timestamps` has 2 entries but `item_ids` has 1"):
        tokenizer.encode_events(["b"], timestamps=[1, 2])


def test_standard_call_on_item_lists(tokenizer):
    enc = tokenizer(["b", "c"], is_split_into_words=True)
    assert enc["input_ids"] == [5, 6]
    assert tokenizer.decode([4, 5]) in ("Toy Story (1995) b", "Toy Story (1995)b")


def test_encode_sequences_matches_single_encoding(tokenizer):
    sequences = pa.table(
        {
            "item_ids": [["b", "c", "Toy Story (1995)", "new"], ["c"], ["x", "b"]],
            "actions": [["buy", "click", "view", "click"], ["view"], ["click", "buy"]],
            "timestamps": [[1, 2, 3, 4], [7], [5, 6]],
        }
    )
    encoded = tokenizer.encode_sequences(sequences).to_pylist()
    for row, expected_source in zip(encoded, sequences.to_pylist()):
        expected = tokenizer.encode_events(
            expected_source["item_ids"], actions=expected_source["actions"], timestamps=expected_source["timestamps"]
        )
        assert row == dict(expected)
    with pytest.raises(ValueError, match="Unknown actions"):
        tokenizer.encode_sequences(pa.table({"item_ids": [["b"]], "actions": [["like"]], "timestamps": [[1]]}))


def test_save_and_load_round_trip(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    for loaded in (PinFMTokenizer.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(tmp_path)):
        assert isinstance(loaded, PinFMTokenizer)
        assert loaded.get_vocab() == tokenizer.get_vocab()
        assert loaded.action_tokens == tokenizer.action_tokens
        assert loaded.model_max_length == 3
        assert loaded.convert_tokens_to_ids("unseen") == tokenizer.convert_tokens_to_ids("unseen")
    assert not list(tmp_path.glob(".tmp-*"))  # atomic write leaves no temp file


@pytest.mark.slow
def test_real_ml1m_vocabulary(ml1m_events):
    tok = PinFMTokenizer.from_events(ml1m_events, num_hash_buckets=128)
    assert tok.num_items == 3706
    assert tok.action_tokens[2:] == ["rating_1", "rating_2", "rating_3", "rating_4", "rating_5"]


def test_encode_sequences_honours_dataset_selection(tokenizer):
    import datasets

    data = datasets.Dataset.from_dict({"item_ids": [["b"], ["c"], ["b", "c"]], "actions": [["buy"], ["view"], ["buy", "view"]]})
    picked = data.select([2, 0])
    assert tokenizer.encode_sequences(picked).column("input_ids").to_pylist() == [[5, 6], [5]]


def test_hold_out_last_gives_the_target_and_its_request_time(tokenizer):
    sequences = pa.table({"item_ids": [["b", "c", "b"], ["x", "c"]], "actions": [["buy", "click", "view"], ["click", "buy"]],
                          "timestamps": [[1, 2, 3], [5, 9]]})
    rows = tokenizer.encode_sequences(sequences, max_length=1, hold_out_last=True).to_pylist()
    assert [r["input_ids"] for r in rows] == [[6], [tokenizer.convert_tokens_to_ids("x")]]  # the most recent inputs
    assert [r["timestamps"] for r in rows] == [[2], [5]]
    assert [r["target_ids"] for r in rows] == [5, 6]
    assert [r["target_timestamps"] for r in rows] == [3, 9]
    assert [r["target_action_ids"] for r in rows] == tokenizer.convert_actions_to_ids(["view", "buy"])


# ----- bad inputs: loading, encoding, padding -----


@pytest.mark.parametrize(
    "content, message",
    [
        (None, r"has no `pinfm_vocab.json`"),
        ('{"items": ["a"', r"pinfm_vocab.json is not valid JSON"),
        ('{"items": ["a"]}', r"pinfm_vocab.json has no `actions` entry"),
        ('["a", "b"]', r"pinfm_vocab.json holds a list"),
        ('{"items": [1, 2], "actions": [], "surfaces": [], "num_hash_buckets": 4}', r"`items` must be a list of strings"),
        ('{"items": [], "actions": [], "surfaces": [], "num_hash_buckets": "4"}', r"`num_hash_buckets` must be an integer"),
    ],
)
def test_from_pretrained_refuses_a_missing_or_corrupt_vocabulary(tokenizer, tmp_path, content, message):
    tokenizer.save_pretrained(tmp_path)
    vocab = tmp_path / "pinfm_vocab.json"
    if content is None:
        vocab.unlink()
    else:
        vocab.write_text(content)
    for load in (PinFMTokenizer.from_pretrained, AutoTokenizer.from_pretrained):
        with pytest.raises(ValueError, match=message) as error:
            load(tmp_path)
        assert str(tmp_path) in str(error.value) and "\n" not in str(error.value)
    assert len(PinFMTokenizer()) == 4 + 1024  # building one directly without a vocabulary stays allowed


def test_encode_events_accepts_integer_item_ids_like_the_pipeline(tokenizer):
    import numpy as np

    expected = tokenizer.encode_events(["2268318", "b"])["input_ids"]
    assert tokenizer.encode_events([2268318, "b"])["input_ids"] == expected
    assert tokenizer.encode_events(np.array([2268318]))["input_ids"] == expected[:1]
    for bad in (True, None, 3.0):
        with pytest.raises(TypeError, match=r"`item_ids\[1\]` must be a string or an integer"):
            tokenizer.encode_events(["b", bad])
    with pytest.raises(TypeError, match="list of item ids"):
        tokenizer.encode_events("bc")  # one string is not a history of characters


def test_encode_events_empty_history_and_max_length(tokenizer):
    assert tokenizer.encode_events([], actions=[], timestamps=[])["input_ids"] == []  # lists: a CTR row appends its candidate
    with pytest.raises(ValueError, match="`item_ids` is empty"):
        tokenizer.encode_events([], actions=[], timestamps=[], return_tensors="pt")
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="`max_length` must be a positive integer"):
            tokenizer.encode_events(["b", "c"], max_length=bad)


def test_encode_events_timestamps_are_integers_in_order(tokenizer):
    assert tokenizer.encode_events(["b", "c"], timestamps=["3", -1 + 5])["timestamps"] == [3, 4]
    for bad in (1.7, "abc", None, True):
        with pytest.raises(TypeError, match=r"`timestamps\[1\]` must be an integer"):
            tokenizer.encode_events(["b", "c"], timestamps=[1, bad])
    with pytest.raises(ValueError, match=r"`timestamps\[2\]` \(4\) is before `timestamps\[1\]` \(9\)"):
        tokenizer.encode_events(["b", "c", "b"], timestamps=[1, 9, 4])


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_pad_pads_every_per_event_key_like_the_collator(tokenizer, padding_side):
    from pinfm_hf.data import PinFMDataCollator

    examples = [
        tokenizer.encode_events(["b", "c", "Toy Story (1995)"], actions=["buy", "click", "view"], timestamps=[1, 2, 3]),
        tokenizer.encode_events(["c"], actions=["view"], timestamps=[7]),
    ]
    collator = PinFMDataCollator(pad_token_id=tokenizer.pad_token_id, padding_side=padding_side)
    expected = collator([dict(e) for e in examples])
    padded = tokenizer.pad(examples, padding_side=padding_side, return_tensors="pt")
    assert set(padded) == set(expected)
    for key in expected:
        assert torch.equal(padded[key], expected[key]), key
    # `max_length` keeps the most recent events, as the collator does.
    truncating = PinFMDataCollator(pad_token_id=tokenizer.pad_token_id, padding_side=padding_side, max_length=2)
    padded = tokenizer.pad(examples, padding="max_length", max_length=2, padding_side=padding_side, return_tensors="pt")
    for key, value in truncating([dict(e) for e in examples]).items():
        assert torch.equal(padded[key], value), key
    wider = tokenizer.pad(examples, padding="max_length", max_length=5, padding_side=padding_side)
    assert all(len(row) == 5 for key in wider for row in wider[key])
    with pytest.raises(ValueError, match="`timestamps` has 1 values but `input_ids` has 3"):
        tokenizer.pad([{**examples[0], "timestamps": [1]}, examples[1]])


def test_check_tokenizer_matches_model(tokenizer):
    from pinfm_hf import PinFMConfig
    from pinfm_hf.tokenization_pinfm import check_tokenizer_matches_model

    config = PinFMConfig(item_vocab_size=len(tokenizer), action_vocab_size=tokenizer.action_vocab_size)
    check_tokenizer_matches_model(tokenizer, config)
    config.item_vocab_size = len(tokenizer) + 1
    with pytest.raises(ValueError, match=rf"{len(tokenizer)} item tokens but the model's item table has {len(tokenizer) + 1}"):
        check_tokenizer_matches_model(tokenizer, config)
    config.item_vocab_size, config.action_vocab_size = len(tokenizer), 3
    with pytest.raises(ValueError, match="5 action tokens but the model's action table has 3"):
        check_tokenizer_matches_model(tokenizer, config)


def test_unknown_surface_maps_to_unk():
    tok = PinFMTokenizer(items=["a"], actions=["x"], surfaces=["home"], num_hash_buckets=2)
    assert tok.encode_events(["a", "a"], surfaces=["home", "nowhere"])["surface_ids"] == [2, 1]  # <unk>, not an error


def test_vocabulary_free_tokenizer_stores_no_item_and_hashes_stably_across_processes(tmp_path):
    # PinFM's vocabulary-free mode: 2^20 hashed ids, no per-item entry anywhere (in memory or in the saved file).
    import subprocess
    import sys

    tokenizer = PinFMTokenizer(items=[], actions=["click"], num_hash_buckets=2**20)
    assert len(tokenizer) == 4 + 2**20 and len(tokenizer.item_tokens) == 4 and len(tokenizer.item_to_id) == 4
    items = ["pin-1", "42", "a b", "pin-1"]
    ids = tokenizer.encode_events(items)["input_ids"]
    assert ids[0] == ids[3] and len(set(ids)) == 3 and all(4 <= i < 4 + 2**20 for i in ids)
    assert tokenizer.convert_ids_to_tokens(ids[1]) == f"<bucket_{ids[1] - 4}>"
    assert tokenizer.convert_tokens_to_ids(f"<bucket_{ids[1] - 4}>") == ids[1]
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "pinfm_vocab.json").stat().st_size < 200
    # Another process (another hash seed) and the bulk path give the same ids.
    script = ("import sys; from transformers import AutoTokenizer; import pinfm_hf; "
              "print(AutoTokenizer.from_pretrained(sys.argv[1]).encode_events(sys.argv[2:])['input_ids'])")
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path), *items], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "PYTHONHASHSEED": "123"})
    assert out.stdout.strip() == str(ids)
    import pyarrow as pa

    assert tokenizer.item_ids_to_token_ids(pa.array(items)).tolist() == ids


def test_a_large_vocabulary_is_kept_and_saved_compactly_with_the_same_ids(tmp_path, monkeypatch):
    import subprocess
    import sys

    import pyarrow as pa
    from transformers import AutoTokenizer

    import pinfm_hf.tokenization_pinfm as tokenization

    items = [f"pin-{i * 7919 % 10**9}" for i in range(tokenization.LARGE_VOCABULARY + 5000)]
    large = PinFMTokenizer(items=items, actions=["click"], num_hash_buckets=64)
    monkeypatch.setattr(tokenization, "LARGE_VOCABULARY", 10**9)
    small = PinFMTokenizer(items=items, actions=["click"], num_hash_buckets=64)  # the dict path, for reference
    assert large._index is not None and small._index is None and len(large) == len(small)
    probe = [items[0], items[-1], "pin-unseen", items[12345], "<bucket_3>", "<pad>"]
    assert large.encode_events(probe)["input_ids"] == small.encode_events(probe)["input_ids"]
    assert large.item_ids_to_token_ids(pa.array(probe * 3)).tolist() == small.item_ids_to_token_ids(pa.array(probe * 3)).tolist()
    assert large.convert_ids_to_tokens([4, 4 + 12345, len(items) + 4]) == [items[0], items[12345], "<bucket_0>"]
    assert len(large.get_vocab()) == len(small.get_vocab()) and large.get_vocab()[items[7]] == 11
    # Saved as an Arrow file beside a small JSON; loaded by AutoTokenizer, and with trust_remote_code where pinfm_hf is
    # not importable.
    large.save_pretrained(tmp_path)
    assert (tmp_path / "pinfm_items.arrow").is_file() and (tmp_path / "pinfm_vocab.json").stat().st_size < 300
    assert AutoTokenizer.from_pretrained(tmp_path).encode_events(probe)["input_ids"] == large.encode_events(probe)["input_ids"]
    script = ("import importlib.abc, sys\n"
              "class Block(importlib.abc.MetaPathFinder):\n"
              "    def find_spec(self, name, path=None, target=None):\n"
              "        if name.split('.')[0] == 'pinfm_hf': raise ModuleNotFoundError(name)\n"
              "sys.meta_path.insert(0, Block())\n"
              "from transformers import AutoTokenizer\n"
              "print(AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True).encode_events(sys.argv[2:])['input_ids'])")
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path), *probe], capture_output=True, text=True, env=env,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == str(large.encode_events(probe)["input_ids"])
    (tmp_path / "pinfm_items.arrow").unlink()
    with pytest.raises(ValueError, match="keeps its items in pinfm_items.arrow"):
        AutoTokenizer.from_pretrained(tmp_path)
