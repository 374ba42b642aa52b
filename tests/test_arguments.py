"""Recipe arguments (`pinfm_hf.arguments`): every flag is checked when parsed, before data loads, naming the flag."""

import dataclasses
from pathlib import Path
from typing import Optional

import pyarrow as pa
import pytest
import yaml

from pinfm_hf import PinFMConfig, PretrainingObjective
from pinfm_hf.arguments import (
    CTRDataArguments,
    CTRModelArguments,
    CTRTrainingArguments,
    ModelArguments,
    PretrainingArguments,
    PretrainingDataArguments,
)
from pinfm_hf.data import request_ids, sample_requests
from pinfm_hf.hub import HubArguments
from pinfm_hf.training_utils import parse_recipe_args


PRETRAINING = (PretrainingDataArguments, ModelArguments, PretrainingObjective, PretrainingArguments, HubArguments)
NUMERIC = (int, float, Optional[int], Optional[float], list[int])


def test_positive_actions():
    known = ["pv", "cart"]
    args = PretrainingDataArguments(dataset="taobao", positive_actions="default")
    assert args.positive_action_names(known) == ["cart", "fav", "buy"]
    assert PretrainingDataArguments(positive_actions="all").positive_action_names(known) is None
    with pytest.raises(ValueError, match="Unknown action 'like'"):
        PretrainingDataArguments(positive_actions="pv, like").positive_action_names(known)
    with pytest.raises(ValueError, match="No default positive actions for 'my.csv'"):
        PretrainingDataArguments(dataset="my.csv", positive_actions="default").positive_action_names(known)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--checkpointing_steps", "0"], "--checkpointing_steps must be > 0, got 0"),
        (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be > 0, got 0"),
        (["--max_length", "-5"], "--max_length must be > 0, got -5"),
        (["--initial_temperature", "0"], "--initial_temperature must be > 0, got 0.0"),
        (["--learning_rate", "nan"], "--learning_rate must be > 0, got nan"),
        (["--hidden_dropout_prob", "1.5"], r"`hidden_dropout_prob` \(1.5\) must be in \[0, 1\)"),
        (["--time_cut_quantile", "1"], "--time_cut_quantile must be strictly between 0 and 1, got 1.0"),
        (["--max_steps", "0"], "--max_steps must be -1 .* or >= 1, got 0"),
        (["--train_holdout", "0"], "--train_holdout must be > 0, got 0"),
        (["--hub_model_id", "org/bad name"], "--hub_model_id 'org/bad name' is not a valid repo id"),
        (["--negative_sampling", "zipf"], "--negative_sampling must be 'uniform' or 'popularity'"),
        (["--mixed_precision", "fp8"], "--mixed_precision must be"),
        (["--timestamp_unit", "seconds"], "--timestamp_unit"),
    ],
)
def test_out_of_range_flags_are_refused_when_parsed(flags, message):
    with pytest.raises(ValueError, match=message):
        parse_recipe_args(PRETRAINING, flags)


@pytest.mark.parametrize(
    "classes",
    [PRETRAINING[:4], (CTRDataArguments, CTRModelArguments, CTRTrainingArguments)],
    ids=["pretraining", "ctr"],
)
def test_every_numeric_flag_is_range_checked(classes):
    # A new numeric field without a range check would accept -5 silently: this fails until it gets one.
    for cls in classes:
        for field in dataclasses.fields(cls):
            if field.type in NUMERIC or field.type in ("int", "float", "Optional[int]", "Optional[float]"):
                value = [-5] if field.type == list[int] else -5
                with pytest.raises(ValueError, match=f"(--|`){field.name}(`| must)"):
                    cls(**{field.name: value})


def test_model_flags_are_the_config_fields_with_its_defaults_and_help():
    # One source of truth: a model flag is a PinFMConfig field, with the config's default and docstring.
    config = PinFMConfig()
    for cls in (ModelArguments, CTRModelArguments):
        for field in dataclasses.fields(cls):
            if not hasattr(config, field.name) or field.name in ("base",):
                continue
            default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
            if default is not None:
                assert default == getattr(config, field.name), field.name
            assert field.metadata["help"], field.name
    assert ModelArguments().hidden_dropout_prob == PinFMConfig().hidden_dropout_prob
    assert CTRModelArguments().ctr_head_hidden_sizes == PinFMConfig().ctr_head_hidden_sizes
    (model_args,) = parse_recipe_args((ModelArguments,), ["--hidden_size", "48", "--use_time_features", "false"])
    config = PinFMConfig(**dataclasses.asdict(model_args))
    assert (config.hidden_size, config.use_time_features) == (48, False)


def test_use_case_actions():
    assert CTRDataArguments(dataset="taobao", use_case="engage").actions() == (["cart", "fav", "buy"], ["pv"])
    custom = CTRDataArguments(dataset="my.csv", use_case="custom", positive_actions="buy, cart", negative_actions="view")
    assert custom.actions() == (["buy", "cart"], ["view"])
    with pytest.raises(ValueError, match="Unknown --use_case 'likes'"):
        CTRDataArguments(use_case="likes").actions()
    with pytest.raises(ValueError, match="defined on 'ml-1m', not 'taobao'"):
        CTRDataArguments(dataset="taobao", use_case="like").actions()
    with pytest.raises(ValueError, match="needs both --positive_actions and --negative_actions"):
        CTRDataArguments(use_case="custom", positive_actions="buy").actions()
    with pytest.raises(ValueError, match="--transfer must be one of"):
        CTRModelArguments(transfer="lor")


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


CONFIGS = sorted((Path(__file__).resolve().parents[1] / "recipes" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_shipped_config_parses(config):
    # A renamed or removed flag would otherwise surface only when someone runs that config.
    is_ctr = "use_case" in yaml.safe_load(config.read_text())
    classes = (CTRDataArguments, CTRModelArguments, PretrainingObjective, CTRTrainingArguments, HubArguments) if is_ctr else PRETRAINING
    parsed = parse_recipe_args(classes, ["--config", str(config)])
    assert len(parsed) == len(classes)


@pytest.mark.parametrize("given, repeat_share, expected", [
    ("auto", 0.0, True), ("auto", 0.2425, False),  # ML-1M and Amazon reviews never repeat; Taobao's sample does
    ("true", 0.5, True), (False, 0.0, False), ("false", 0.0, False),
])
def test_history_exclusion_is_chosen_from_whether_items_repeat(given, repeat_share, expected):
    data_args = PretrainingDataArguments(eval_exclude_history=given)
    assert data_args.resolve_eval_exclude_history(repeat_share) is expected
    assert data_args.eval_exclude_history is expected  # what results.json and the card then record


def test_full_softmax_auto_follows_the_catalogue_size():
    assert PretrainingObjective(full_softmax=True).full_softmax is True
    assert PretrainingObjective(full_softmax="false").full_softmax is False
    small, large = PretrainingObjective(full_softmax="auto"), PretrainingObjective(full_softmax="auto")
    assert small.resolve_full_softmax(18_000, 100_000) is True and small.full_softmax is True
    assert large.resolve_full_softmax(2_000_000, 100_000) is False
    with pytest.raises(ValueError, match="--full_softmax must be 'true', 'false' or 'auto', got 'sometimes'"):
        PretrainingObjective(full_softmax="sometimes")
    with pytest.raises(ValueError, match="--eval_exclude_history must be 'auto', 'true' or 'false'"):
        PretrainingDataArguments(eval_exclude_history="maybe")


def test_unresolved_full_softmax_auto_is_refused_by_the_loss():
    import torch

    from pinfm_hf import PinFMConfig, PinFMForPretraining

    model = PinFMForPretraining(PinFMConfig(item_vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2))
    model.objective = PretrainingObjective(full_softmax="auto")
    ids = torch.tensor([[4, 5, 6]])
    with pytest.raises(ValueError, match="`objective.full_softmax` is 'auto'"):
        model(input_ids=ids, action_ids=torch.full_like(ids, 2), timestamps=torch.tensor([[1, 2, 3]]), labels=ids)


@pytest.mark.parametrize("script", ["pretrain.py", "finetune_ctr.py"])
def test_recipe_help_prints_every_flag(script):
    # `--help` formats every help string with %-expansion: one stray '%' breaks it for the whole recipe.
    import subprocess
    import sys

    recipe = Path(__file__).resolve().parents[1] / "recipes" / script
    result = subprocess.run([sys.executable, str(recipe), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--config" in result.stdout and "--learning_rate" in result.stdout


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--validation_cut_quantile", "0.95"], r"--validation_cut_quantile \(0.95\) must be below --cut_quantile \(0.9\)"),
        (["--card_comparison", "no/such/report.json"], "--card_comparison no/such/report.json: no such file"),
        (["--early_stopping_patience", "1", "--eval_every_epochs", "1"], "add --load_best_model_at_end true"),
        (["--load_best_model_at_end", "true"], "need --eval_every_epochs >= 1"),
    ],
)
def test_bad_ctr_validation_flags_are_refused_when_parsed(flags, message):
    with pytest.raises(ValueError, match=message):
        parse_recipe_args((CTRDataArguments, CTRModelArguments, CTRTrainingArguments), ["--dataset", "ml-1m", *flags])
