"""Bad recipe inputs fail with errors that name the field (fast: no training)."""

import dataclasses
import sys
from pathlib import Path
from typing import Optional

import pyarrow as pa
import pytest

from pinfm_hf import PinFMTokenizer
from pinfm_hf.hub import HubArguments
from pinfm_hf.training_utils import parse_recipe_args


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



@pytest.mark.parametrize(
    "flags, message",
    [
        (["--checkpointing_steps", "0"], "--checkpointing_steps must be > 0, got 0"),
        (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be > 0, got 0"),
        (["--max_length", "-5"], "--max_length must be > 0, got -5"),
        (["--initial_temperature", "0"], "--initial_temperature must be > 0, got 0.0"),
        (["--learning_rate", "nan"], "--learning_rate must be > 0, got nan"),
        (["--hidden_dropout_prob", "1.5"], r"--hidden_dropout_prob must be in \[0, 1\), got 1.5"),
        (["--time_cut_quantile", "1"], "--time_cut_quantile must be strictly between 0 and 1, got 1.0"),
        (["--max_steps", "0"], "--max_steps must be -1 .* or >= 1, got 0"),
        (["--train_holdout", "0"], "--train_holdout must be > 0, got 0"),
        (["--hub_model_id", "org/bad name"], "--hub_model_id 'org/bad name' is not a valid repo id"),
    ],
)
def test_out_of_range_flags_are_refused_when_parsed(flags, message):
    with pytest.raises(ValueError, match=message):
        parse_recipe_args((pretrain.DataArguments, pretrain.ModelArguments, pretrain.TrainArguments, HubArguments), flags)


def test_every_numeric_flag_is_range_checked():
    # A new numeric field without a range check would accept -5 silently: this fails until it gets one.
    for cls in (pretrain.DataArguments, pretrain.ModelArguments, pretrain.TrainArguments):
        for field in dataclasses.fields(cls):
            if field.type in (int, float, Optional[int], Optional[float]):
                with pytest.raises(ValueError, match=f"--{field.name} must be"):
                    cls(**{field.name: -5})
