"""CTR recipe inputs: use cases, user-feature files, and sampling whole requests (fast: no training)."""

import dataclasses
import sys
from pathlib import Path
from typing import Optional

import pyarrow as pa
import pytest

from pinfm_hf.data import request_ids, sample_requests


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
import finetune_ctr  # noqa: E402


def test_use_case_actions():
    args = finetune_ctr.DataArguments(dataset="taobao", use_case="engage")
    assert finetune_ctr.use_case_actions(args) == (["cart", "fav", "buy"], ["pv"])
    custom = finetune_ctr.DataArguments(dataset="my.csv", use_case="custom", positive_actions="buy, cart", negative_actions="view")
    assert finetune_ctr.use_case_actions(custom) == (["buy", "cart"], ["view"])
    with pytest.raises(ValueError, match="Unknown --use_case 'likes'"):
        finetune_ctr.use_case_actions(finetune_ctr.DataArguments(use_case="likes"))
    with pytest.raises(ValueError, match="defined on 'ml-1m', not 'taobao'"):
        finetune_ctr.use_case_actions(finetune_ctr.DataArguments(dataset="taobao", use_case="like"))
    with pytest.raises(ValueError, match="needs both --positive_actions and --negative_actions"):
        finetune_ctr.use_case_actions(finetune_ctr.DataArguments(use_case="custom", positive_actions="buy"))


def test_sample_requests_keeps_whole_requests():
    # Requests: rows (0, 1) share user, history and second; every other row is its own request.
    samples = pa.table({
        "user_index": [0, 0, 0, 1, 1, 2, 2, 2], "history_length": [0, 0, 2, 0, 1, 0, 1, 1],
        "timestamp": [5, 5, 7, 1, 2, 3, 4, 4], "row": list(range(8)),
    })
    assert sample_requests(samples, None, 0) is samples
    assert request_ids(*(samples[c].to_numpy() for c in ("user_index", "history_length", "timestamp"))).tolist() == [
        0, 0, 1, 2, 3, 4, 5, 5
    ]
    for seed in range(20):
        rows = sample_requests(samples, 3, seed)["row"].to_pylist()
        assert rows == sorted(rows) and 3 <= len(rows) <= 4  # whole requests: at most one row over
        assert (0 in rows) == (1 in rows) and (6 in rows) == (7 in rows)


def test_every_numeric_flag_is_range_checked():
    # A new numeric field without a range check would accept -5 silently: this fails until it gets one.
    for cls in (finetune_ctr.DataArguments, finetune_ctr.ModelArguments, finetune_ctr.TrainArguments):
        for field in dataclasses.fields(cls):
            if field.type in (int, float, Optional[int], Optional[float], list[int]):
                value = [-5] if field.type == list[int] else -5
                with pytest.raises(ValueError, match=f"--{field.name} must be"):
                    cls(**{field.name: value})
