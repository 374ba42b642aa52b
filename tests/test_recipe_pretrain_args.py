"""Bad recipe inputs fail with errors that name the field (fast: no training)."""

import sys
from pathlib import Path

import pyarrow as pa
import pytest

from pinfm_hf import PinFMTokenizer


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
import pretrain  # noqa: E402


@pytest.fixture
def tokenizer():
    return PinFMTokenizer.from_events(pa.table({"item_id": ["a"], "action": ["pv"]}), num_hash_buckets=2)


def test_positive_actions(tokenizer):
    args = pretrain.DataArguments(dataset="taobao", positive_actions="default")
    assert pretrain.positive_action_names(args, tokenizer) == ["cart", "fav", "buy"]
    assert pretrain.positive_action_names(pretrain.DataArguments(positive_actions="all"), tokenizer) is None
    with pytest.raises(ValueError, match="Unknown action 'like'"):
        pretrain.positive_action_names(pretrain.DataArguments(positive_actions="pv, like"), tokenizer)
    with pytest.raises(ValueError, match="No default positive actions for 'my.csv'"):
        pretrain.positive_action_names(pretrain.DataArguments(dataset="my.csv", positive_actions="default"), tokenizer)

