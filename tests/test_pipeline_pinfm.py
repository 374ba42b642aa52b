"""The `pinfm-recommendation` pipeline on a tiny model trained on real ML-1M users, installed and as remote code."""

import copy
import json
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import datasets
import pyarrow.compute as pc
import pytest
import torch
from transformers import pipeline

from pinfm_hf import PINFM_PIPELINE_TASK, PinFMConfig, PinFMForPretraining, PinFMRecommendationPipeline, PinFMTokenizer
from pinfm_hf.data import PinFMDataCollator, build_user_sequences
from pinfm_hf.pipeline_pinfm import saved_custom_pipelines, validate_history
from test_remote_code import WITHOUT_PINFM_HF


@dataclass
class TinyModel:
    model: PinFMForPretraining
    tokenizer: PinFMTokenizer
    sequences: datasets.Dataset
    folder: Path


def train_tiny_model(events, folder: Path, num_users: int = 120, steps: int = 24) -> TinyModel:
    """A 1-layer d=32 model trained a few steps on the first `num_users` ML-1M users, saved to `folder` (~15 s)."""
    users = pc.unique(events.table["user_id"])[:num_users]
    table = events.table.filter(pc.is_in(events.table["user_id"], value_set=users))
    sequences = build_user_sequences(table)
    tokenizer = PinFMTokenizer.from_events(table, num_hash_buckets=16, model_max_length=50)
    train = datasets.Dataset(tokenizer.encode_sequences(sequences, windows=True))
    torch.manual_seed(0)
    config = PinFMConfig(
        item_vocab_size=len(tokenizer), action_vocab_size=tokenizer.action_vocab_size, hidden_size=32,
        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=51,
    )
    model = PinFMForPretraining(config)
    collator = PinFMDataCollator(pad_token_id=tokenizer.pad_token_id, return_labels=True)
    loader = torch.utils.data.DataLoader(train, batch_size=32, shuffle=True, collate_fn=collator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    step = 0
    while step < steps:
        for batch in loader:
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if step == steps:
                break
    model.eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return TinyModel(model, tokenizer, sequences, folder)


def user_events(sequences: datasets.Dataset, row: int) -> list[dict]:
    """A user's history as the raw event dicts a caller would pass, oldest first."""
    user = sequences[row]
    return [
        {"item_id": item, "action": action, "timestamp": timestamp}
        for item, action, timestamp in zip(user["item_ids"], user["actions"], user["timestamps"])
    ]


@torch.no_grad()
def direct_top_k(tiny: TinyModel, events: list[dict], k: int, excluded: tuple[str, ...] = ()) -> tuple[list[str], torch.Tensor]:
    """Top-k straight from `model.score_items` at the last event; hash buckets and `excluded` raw ids masked."""
    tokenizer = tiny.tokenizer
    encoded = tokenizer.encode_events(
        [e["item_id"] for e in events], actions=[e["action"] for e in events],
        timestamps=[e["timestamp"] for e in events], return_tensors="pt",
    )
    query = tiny.model(**encoded).query_embeddings[:, -1]  # unpadded: the last position is the last event
    scores = tiny.model.score_items(query)[0]
    scores[tokenizer.first_bucket_id :] = float("-inf")
    scores[tokenizer.convert_tokens_to_ids(list(excluded))] = float("-inf")
    top = scores.topk(k)
    return tokenizer.convert_ids_to_tokens(top.indices.tolist()), top.values


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, ml1m_events) -> TinyModel:
    return train_tiny_model(ml1m_events, tmp_path_factory.mktemp("tiny_pinfm"))


@pytest.fixture(scope="module")
def recommend(tiny):
    """Loaded the way users of the installed package load it: by task name and folder."""
    return pipeline(PINFM_PIPELINE_TASK, model=str(tiny.folder), device="cpu")


def rotate_at_time_boundary(events: list[dict]) -> list[dict]:
    """Newer half first: a stable sort by timestamp restores the input exactly (no tie is split)."""
    k = next(i for i in range(len(events) // 2, len(events)) if events[i]["timestamp"] > events[i - 1]["timestamp"])
    return events[k:] + events[:k]


def test_top_k_equals_direct_scores(tiny, recommend):
    assert isinstance(recommend, PinFMRecommendationPipeline)
    events = user_events(tiny.sequences, 0)
    shuffled = rotate_at_time_boundary(events)
    assert shuffled != events
    for exclude_history in (False, True):
        result = recommend(shuffled, top_k=10, exclude_history=exclude_history)
        excluded = tuple(e["item_id"] for e in events) if exclude_history else ()
        ids, scores = direct_top_k(tiny, events, 10, excluded)
        assert [r["item_id"] for r in result] == ids
        torch.testing.assert_close(torch.tensor([r["score"] for r in result]), scores, rtol=1e-5, atol=1e-5)
    assert len(recommend(events)) == 10  # default top_k


def test_model_objects_give_the_same_pipeline(tiny, recommend):
    direct = pipeline(PINFM_PIPELINE_TASK, model=tiny.model, tokenizer=tiny.tokenizer, device="cpu")
    events = user_events(tiny.sequences, 1)
    assert direct(events, top_k=5) == recommend(events, top_k=5)


def test_exclusions_and_vocabulary(tiny, recommend):
    tokenizer = tiny.tokenizer
    real_items = tokenizer.item_tokens[tiny.model.config.num_special_item_tokens : tokenizer.first_bucket_id]
    # An item unseen at tokenizer build lands in a hash bucket: buckets must still never be recommended.
    events = user_events(tiny.sequences, 2) + [{"item_id": "not-a-movie", "action": "rating_5", "timestamp": 2**40}]
    history = {e["item_id"] for e in events} & set(real_items)

    everything = recommend(events, top_k=len(tokenizer), exclude_history=False)
    assert sorted(r["item_id"] for r in everything) == sorted(real_items)  # no special token, no bucket
    scores = [r["score"] for r in everything]
    assert scores == sorted(scores, reverse=True)
    assert history <= {r["item_id"] for r in everything}  # not excluded: history items can come back

    unseen = recommend(events, top_k=len(tokenizer))
    assert len(unseen) == len(real_items) - len(history)
    assert not history & {r["item_id"] for r in unseen}

    top = [r["item_id"] for r in recommend(events, top_k=5)]
    extra = recommend(events, top_k=5, exclude_items=top[:3] + ["not-a-movie", "never-seen"])
    assert not set(top[:3]) & {r["item_id"] for r in extra}
    assert [r["item_id"] for r in extra][:2] == top[3:]
    assert recommend(events, top_k=1, exclude_items=top[0])[0]["item_id"] == top[1]  # one raw id, not a list


def test_batch_equals_single_calls(tiny, recommend):
    histories = [user_events(tiny.sequences, row) for row in (3, 4, 5)]
    columns = {
        "item_id": [e["item_id"] for e in histories[2]],
        "action": [e["action"] for e in histories[2]],
        "timestamp": [e["timestamp"] for e in histories[2]],
    }
    single = [recommend(h, top_k=7) for h in histories]
    assert recommend(columns, top_k=7) == single[2]
    assert recommend([histories[0], histories[1], columns], top_k=7) == single
    padded = recommend(histories, top_k=7, batch_size=3)  # padded together in one forward pass
    for got, expected in zip(padded, single):
        # The same scores up to float noise; two items whose scores tie within it may swap places.
        torch.testing.assert_close([r["score"] for r in got], [r["score"] for r in expected], rtol=1e-4, atol=1e-4)
        for a, b in zip(got, expected):
            assert a["item_id"] == b["item_id"] or abs(a["score"] - b["score"]) <= 1e-4
        scores = {r["item_id"]: r["score"] for r in expected}
        for r in got:
            assert r["item_id"] in scores or r["score"] - expected[-1]["score"] <= 1e-4  # a tie at the cut-off
            assert r["item_id"] not in scores or abs(r["score"] - scores[r["item_id"]]) <= 1e-4


def test_stable_sort_by_timestamp():
    events = [
        {"item_id": "b", "action": "x", "timestamp": 5},
        {"item_id": "a", "action": "x", "timestamp": "3"},
        {"item_id": 7, "action": "x", "timestamp": 5, "surface": "home"},
    ]
    events[0]["surface"] = events[1]["surface"] = "search"
    columns = validate_history(events, ["x"])
    assert columns == {
        "item_id": ["a", "b", "7"], "action": ["x"] * 3, "timestamp": [3, 5, 5], "surface": ["search", "search", "home"],
    }


GOOD = {"item_id": "Toy Story (1995)", "action": "rating_4", "timestamp": 978300760}


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"item_id": None}, r"Event 1: `item_id` is missing or empty"),
        ({"item_id": ""}, r"Event 1: `item_id` is missing or empty"),
        ({"action": "  "}, r"Event 1: `action` is missing or empty"),
        ({"action": "rating_9"}, r"Event 1: unknown `action` 'rating_9'"),
        ({"timestamp": 1.5}, r"Event 1: `timestamp` must be an integer"),
        ({"timestamp": "yesterday"}, r"Event 1: `timestamp` must be an integer"),
        ({"timestamp": True}, r"Event 1: `timestamp` must be an integer"),
        ({"item_id": 3.0}, r"Event 1: `item_id` must be a string or an integer"),
    ],
)
def test_bad_events_name_the_field_and_index(recommend, bad, message):
    with pytest.raises(ValueError, match=message):
        recommend([GOOD, {**GOOD, **bad}, GOOD])


def test_bad_inputs(recommend):
    missing = {k: v for k, v in GOOD.items() if k != "timestamp"}
    with pytest.raises(ValueError, match=r"Event 2: `timestamp` is missing or empty"):
        recommend([GOOD, GOOD, missing])
    with pytest.raises(ValueError, match=r"Event 1: `item_id` is missing or empty"):
        recommend({"item_id": ["1", ""], "action": ["rating_1"] * 2, "timestamp": [1, 2]})
    with pytest.raises(ValueError, match=r"Column `action` has 1 values, but `item_id` has 2"):
        recommend({"item_id": ["1", "2"], "action": ["rating_1"], "timestamp": [1, 2]})
    with pytest.raises(ValueError, match=r"no `timestamp` column"):
        recommend({"item_id": ["1"], "action": ["rating_1"]})
    with pytest.raises(ValueError, match="no events"):
        recommend({"item_id": [], "action": [], "timestamp": []})
    with pytest.raises(ValueError, match="non-empty list"):
        recommend([])
    with pytest.raises(ValueError, match="`top_k` must be a positive integer"):
        recommend([GOOD], top_k=0)
    with pytest.raises(TypeError, match="topk"):
        recommend([GOOD], topk=3)


def test_saved_folders_name_the_pipeline(tiny, tmp_path):
    saved = json.loads((tiny.folder / "config.json").read_text())
    assert saved["custom_pipelines"] == saved_custom_pipelines()
    assert (tiny.folder / "pipeline_pinfm.py").is_file()
    tiny.model.pinfm.save_pretrained(tmp_path)  # an encoder cannot recommend: no pipeline entry
    assert json.loads((tmp_path / "config.json").read_text())["custom_pipelines"] == {}


CHILD = WITHOUT_PINFM_HF + textwrap.dedent(
    """
    import json
    from transformers import pipeline

    folder, events_file = sys.argv[1], sys.argv[2]
    recommend = pipeline(model=folder, trust_remote_code=True, device="cpu")
    events = json.load(open(events_file))
    print(json.dumps({
        "class": type(recommend).__module__ + "." + type(recommend).__name__,
        "single": recommend(events[0], top_k=10),
        "batch": recommend(events, top_k=10, exclude_history=False),
        "pinfm_hf_imported": any(m.startswith("pinfm_hf") for m in sys.modules),
    }))
    """
)


def test_remote_code_pipeline_without_package(tiny, recommend, tmp_path):
    histories = [user_events(tiny.sequences, row) for row in (6, 7)]
    events_file = tmp_path / "events.json"
    events_file.write_text(json.dumps(histories))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules_cache"), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(tiny.folder), str(events_file)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["class"].startswith("transformers_modules.") and report["class"].endswith(".PinFMRecommendationPipeline")
    assert not report["pinfm_hf_imported"]
    expected = [recommend(histories[0], top_k=10)] + recommend(histories, top_k=10, exclude_history=False)
    for got, want in zip([report["single"], *report["batch"]], expected):
        assert [r["item_id"] for r in got] == [r["item_id"] for r in want]
        torch.testing.assert_close([r["score"] for r in got], [r["score"] for r in want], rtol=1e-5, atol=1e-5)


def test_request_time_is_the_gap_after_the_last_event(tiny, recommend):
    events = user_events(tiny.sequences, 6)
    last = events[-1]["timestamp"]
    assert recommend(events, top_k=5, request_time=last) == recommend(events, top_k=5)  # the default
    week_later = recommend(events, top_k=20, request_time=last + 7 * 86_400)
    assert [r["score"] for r in week_later] != [r["score"] for r in recommend(events, top_k=20)]
    encoded = tiny.tokenizer.encode_events(
        [e["item_id"] for e in events], actions=[e["action"] for e in events],
        timestamps=[e["timestamp"] for e in events], return_tensors="pt",
    )
    with torch.no_grad():
        query = tiny.model(**encoded, end_timestamps=torch.tensor([last + 7 * 86_400])).query_embeddings[:, -1]
        scores = tiny.model.score_items(query)[0]
    scores[tiny.tokenizer.first_bucket_id :] = float("-inf")
    scores[tiny.tokenizer.convert_tokens_to_ids([e["item_id"] for e in events])] = float("-inf")
    assert [r["item_id"] for r in week_later] == tiny.tokenizer.convert_ids_to_tokens(scores.topk(20).indices.tolist())
    batch = recommend([events, events[:-1]], top_k=5, request_time=last + 60, batch_size=2)
    single = recommend(events, top_k=5, request_time=last + 60)
    assert [r["item_id"] for r in batch[0]] == [r["item_id"] for r in single]
    torch.testing.assert_close([r["score"] for r in batch[0]], [r["score"] for r in single], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="`request_time`"):
        recommend(events, request_time=last - 1)
    with pytest.raises(ValueError, match="`request_time`"):
        recommend(events, request_time="tomorrow")


# ----- bad inputs: mismatched or corrupt model folders, and call arguments -----


def copy_folder(tiny: TinyModel, tmp_path: Path) -> Path:
    folder = tmp_path / "copy"
    shutil.copytree(tiny.folder, folder)
    return folder


def test_folder_without_vocabulary_is_refused_at_load(tiny, tmp_path):
    folder = copy_folder(tiny, tmp_path)
    (folder / "pinfm_vocab.json").unlink()  # formerly: an empty tokenizer, then "this model knows []" at the call
    with pytest.raises(ValueError, match=r"has no `pinfm_vocab.json`"):
        pipeline(PINFM_PIPELINE_TASK, model=str(folder), device="cpu")


def test_non_finite_weights_are_refused(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = copy_folder(tiny, tmp_path)
    weights = load_file(folder / "model.safetensors")
    weights["pinfm.norm.weight"][0] = float("nan")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model.safetensors holds 1 non-finite \(NaN/inf\) tensor"):
        pipeline(PINFM_PIPELINE_TASK, model=str(folder), device="cpu")  # formerly: [] for every history
    broken = copy.deepcopy(tiny.model)
    with torch.no_grad():
        broken.next_item_head.query_proj.weight[0, 0] = float("inf")
    recommend = pipeline(PINFM_PIPELINE_TASK, model=broken, tokenizer=tiny.tokenizer, device="cpu")
    with pytest.raises(ValueError, match="non-finite scores"):
        recommend(user_events(tiny.sequences, 0))


def test_tokenizer_of_another_model_is_refused(tiny):
    tokenizer = tiny.tokenizer
    known = tokenizer.item_tokens[tiny.model.config.num_special_item_tokens : tokenizer.first_bucket_id]
    other = PinFMTokenizer(items=known[:-1], actions=tokenizer.action_tokens[2:], num_hash_buckets=16)
    with pytest.raises(ValueError, match=rf"{len(tokenizer) - 1} item tokens but the model's item table has {len(tokenizer)}"):
        pipeline(PINFM_PIPELINE_TASK, model=tiny.model, tokenizer=other, device="cpu")
    more_actions = PinFMTokenizer(items=known, actions=tokenizer.action_tokens[2:] + ["share"], num_hash_buckets=16)
    with pytest.raises(ValueError, match="action tokens but the model's action table has"):
        pipeline(PINFM_PIPELINE_TASK, model=tiny.model, tokenizer=more_actions, device="cpu")


def test_histories_are_cut_to_the_model_length(tiny):
    long_tokenizer = copy.deepcopy(tiny.tokenizer)
    long_tokenizer.model_max_length = 200  # longer than the model's max_position_embeddings (51)
    recommend = pipeline(PINFM_PIPELINE_TASK, model=tiny.model, tokenizer=long_tokenizer, device="cpu")
    row = next(i for i in range(len(tiny.sequences)) if len(tiny.sequences[i]["item_ids"]) > 80)
    events = user_events(tiny.sequences, row)
    as_long = TinyModel(tiny.model, long_tokenizer, tiny.sequences, tiny.folder)
    ids, scores = direct_top_k(as_long, events[-51:], 10, excluded=tuple(e["item_id"] for e in events))
    result = recommend(events, top_k=10)
    assert [r["item_id"] for r in result] == ids
    torch.testing.assert_close(torch.tensor([r["score"] for r in result]), scores, rtol=1e-5, atol=1e-5)
    assert recommend.max_events == tiny.model.config.max_position_embeddings == 51


def test_call_arguments_and_histories_already_handled(recommend, tiny):
    events = user_events(tiny.sequences, 8)
    history = {e["item_id"] for e in events}
    with pytest.raises(TypeError, match="`exclude_history` must be a bool, got 'no'"):
        recommend(events, exclude_history="no")  # formerly bool("no"): the history was excluded
    real_items = len(tiny.tokenizer.item_tokens[4 : tiny.tokenizer.first_bucket_id])
    assert len(recommend(events, top_k=10**6)) == real_items - len(history)  # top_k past the catalogue: all items
    assert recommend(events, top_k=5, exclude_items=["never-seen", 2268318]) == recommend(events, top_k=5)
    repeated = recommend(events + events[-3:], top_k=5)  # duplicate events: repeated interactions, no error
    assert len(repeated) == 5 and not history & {r["item_id"] for r in repeated}
    with pytest.raises(ValueError, match="`request_time`"):
        recommend(events, request_time=events[-1]["timestamp"] - 1)
