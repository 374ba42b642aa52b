from dataclasses import dataclass

import pytest
import yaml

from pinfm_hf.checkpointing import list_checkpoints
from pinfm_hf.training_utils import JsonlLogger, check_ranges, parse_recipe_args, read_jsonl


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


def test_repeated_config_is_refused(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"hidden_size": 32}))
    for args in (["--config", str(config), "--config", str(config)], [f"--config={config}", "--config", str(config)]):
        with pytest.raises(ValueError, match="`--config` is given 2 times"):
            parse_recipe_args((Args,), args)


@dataclass
class Ranged:
    steps: int = 1
    rate: float = 0.1
    dropout: float = 0.0
    quantile: float = 0.5
    sizes: tuple = (4, 2)
    limit: int = None

    def __post_init__(self):
        check_ranges(self, positive=("steps", "sizes", "limit"), non_negative=("rate",), fractions=("dropout",), quantiles=("quantile",))


@pytest.mark.parametrize(
    "field, value, allowed",
    [("steps", 0, "> 0"), ("limit", -3, "> 0"), ("sizes", (4, 0), "> 0"), ("rate", -1e-3, ">= 0"), ("rate", float("nan"), ">= 0"),
     ("dropout", 1.0, r"in \[0, 1\)"), ("quantile", 1.0, "strictly between 0 and 1"), ("steps", True, "> 0")],
)
def test_out_of_range_arguments_name_the_flag(field, value, allowed):
    with pytest.raises(ValueError, match=rf"--{field} must be {allowed}, got"):
        Ranged(**{field: value})
    Ranged(limit=None)  # an unset optional passes


def test_checkpoint_listing_ignores_half_written_folders(tmp_path):
    for name in ("checkpoint-10", "checkpoint-2", ".tmp-checkpoint-20", "other"):
        (tmp_path / name).mkdir()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-10"]
    assert list_checkpoints(tmp_path / "none") == []


def test_log_restarts_at_the_resumed_step_and_stays_strict_json(tmp_path):
    log = JsonlLogger(tmp_path / "log.jsonl")
    for step in range(1, 6):
        log.log({"step": step, "loss": 1.0 / step, "grad_norm": float("nan") if step == 5 else 1.0})
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # a line torn by kill -9
    text = (tmp_path / "log.jsonl").read_text()
    assert "NaN" not in text and '"grad_norm": null' in text
    log.restart(3)
    assert [r["step"] for r in read_jsonl(tmp_path / "log.jsonl")] == [1, 2, 3]
    log.restart(0)
    assert not (tmp_path / "log.jsonl").exists()


def test_plot_needs_a_series_of_two_points(tmp_path):
    from pinfm_hf.training_utils import plot_training_curves

    log = JsonlLogger(tmp_path / "log.jsonl")
    log.log({"step": 1, "test/ndcg@10": 0.1})
    assert plot_training_curves(tmp_path / "log.jsonl", tmp_path / "a.png") is None  # one point is no curve
    log.log({"step": 1, "loss": 2.0})
    log.log({"step": 2, "loss": 1.5})
    png = plot_training_curves(tmp_path / "log.jsonl", tmp_path / "b.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


STALLED_RANK = """
import sys, time
from pinfm_hf.training_utils import make_accelerator

accelerator = make_accelerator(sys.argv[1], ddp_timeout=3)
if accelerator.process_index == 1:
    time.sleep(60)  # never reaches the barrier in time
accelerator.wait_for_everyone()
"""


@pytest.mark.slow
def test_a_stalled_rank_fails_the_collective_after_ddp_timeout(tmp_path, two_process_launcher):
    # Rank 0 waits in a barrier that rank 1 does not reach: with ddp_timeout=3 the launch fails with the barrier's
    # timeout in seconds, rather than after the 30-minute default (the test's own limit stops it long before).
    from launched import run_launched

    script = tmp_path / "stalled.py"
    script.write_text(STALLED_RANK)
    result = run_launched([*two_process_launcher, str(script), str(tmp_path)], timeout=50, env={"ACCELERATE_USE_CPU": "1"})
    assert result.returncode != 0
    assert "wait_for_everyone" in result.stderr and "imed out" in result.stderr
