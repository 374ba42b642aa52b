from dataclasses import dataclass

import pytest
import yaml

from pinfm_hf.training_utils import JsonlLogger, list_checkpoints, parse_recipe_args, read_jsonl, resolve_checkpoint


@dataclass
class Args:
    hidden_size: int = 64
    dataset: str = "ml-1m"


def test_yaml_defaults_then_cli_overrides(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"hidden_size": 32, "dataset": "taobao"}))
    (args,) = parse_recipe_args((Args,), ["--config", str(config), "--hidden_size", "48"])
    assert args.hidden_size == 48 and args.dataset == "taobao"


def test_bad_arguments_are_clear_errors(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"hidden_sise": 32}))
    with pytest.raises(ValueError, match=r"c.yaml: unknown keys \['hidden_sise'\]"):
        parse_recipe_args((Args,), ["--config", str(config)])
    with pytest.raises(ValueError, match="Unknown arguments"):
        parse_recipe_args((Args,), ["--bogus", "1"])
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        parse_recipe_args((Args,), ["--config", str(tmp_path / "missing.yaml")])


def test_checkpoint_listing_ignores_half_written_folders(tmp_path):
    for name in ("checkpoint-10", "checkpoint-2", ".tmp-checkpoint-20", "other"):
        (tmp_path / name).mkdir()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-10"]
    assert resolve_checkpoint("latest", tmp_path).name == "checkpoint-10"
    assert resolve_checkpoint("latest", tmp_path / "none") is None
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        resolve_checkpoint(str(tmp_path / "checkpoint-2"), tmp_path)


def test_log_is_truncated_to_the_resumed_step(tmp_path):
    log = JsonlLogger(tmp_path / "log.jsonl")
    for step in range(1, 6):
        log.log({"step": step, "loss": 1.0 / step})
    log.truncate_after(3)
    assert [r["step"] for r in read_jsonl(tmp_path / "log.jsonl")] == [1, 2, 3]


def test_plot_needs_a_series_of_two_points(tmp_path):
    from pinfm_hf.training_utils import plot_training_curves

    log = JsonlLogger(tmp_path / "log.jsonl")
    log.log({"step": 1, "test/ndcg@10": 0.1})
    assert plot_training_curves(tmp_path / "log.jsonl", tmp_path / "a.png") is None  # one point is no curve
    log.log({"step": 1, "loss": 2.0})
    log.log({"step": 2, "loss": 1.5})
    png = plot_training_curves(tmp_path / "log.jsonl", tmp_path / "b.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
