"""Recipe smoke tests on a slice of real ML-1M: end to end, exact resume, and two processes with gradient sync."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from transformers import AutoModel, AutoModelForPreTraining, AutoTokenizer

from pinfm_hf import PinFMForPretraining, PinFMModel, PinFMTokenizer
from pinfm_hf.checkpointing import list_checkpoints
from pinfm_hf.training_utils import read_jsonl

from launched import DDP_TIMEOUT_FLAGS, run_launched


ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "configs" / "tiny_test.yaml"
pytestmark = pytest.mark.slow


def run_recipe(output_dir: Path, *extra: str, launcher: tuple[str, ...] = (), env: dict | None = None) -> subprocess.CompletedProcess:
    command = [*launcher] if launcher else [sys.executable]
    command += [str(ROOT / "recipes" / "pretrain.py"), "--config", str(TINY), "--output_dir", str(output_dir), *extra]
    command += DDP_TIMEOUT_FLAGS if launcher else ()
    result = run_launched(command, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def step_losses(output_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_jsonl(output_dir / "train_log.jsonl") if "loss" in r]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, shared_data_dir):
    output_dir = tmp_path_factory.mktemp("tiny_run")
    run_recipe(output_dir, "--eval_exclude_history", "true")
    return output_dir


def test_end_to_end_outputs_load_through_auto_classes(tiny_run):
    model_dir = tiny_run / "model"
    losses = step_losses(tiny_run)
    assert [s for s, _ in losses] == list(range(1, 9))
    assert losses[-1][1] < losses[0][1]  # it learns
    results = json.loads((tiny_run / "results.json").read_text())
    assert results["test"]["num_users"] == 200 and results["eval_exclude_history"] is True
    assert results["packing"] is True and results["per_device_train_batch_tokens"] > 0  # the default
    assert 0 <= results["test"]["ndcg@10"] <= results["test"]["hr@10"] <= 1
    assert isinstance(AutoModel.from_pretrained(model_dir), PinFMModel)
    model = AutoModelForPreTraining.from_pretrained(model_dir)
    assert isinstance(model, PinFMForPretraining) and model.has_item_counts
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert isinstance(tokenizer, PinFMTokenizer) and len(tokenizer) == model.config.item_vocab_size
    assert (tiny_run / "training_curves.png").stat().st_size > 1000
    card = ModelCard.load(model_dir / "README.md")
    assert card.data.library_name == "transformers"
    assert card.data.eval_results and {r.metric_type for r in card.data.eval_results} >= {"ndcg@10", "hr@10"}
    assert f"{results['test']['ndcg@10']:.4f}" in card.text
    assert "items of the history masked (HSTU's protocol)" in card.text
    assert "all but each user's last event (HSTU's protocol" in card.text  # --train_holdout 1 (tiny_test.yaml)
    assert f"packed rows, {results['per_device_train_batch_tokens']:,} events per batch" in card.text
    assert len(list_checkpoints(tiny_run / "checkpoints")) == 2  # last K kept


def test_resume_gives_the_same_losses(tiny_run, tmp_path):
    interrupted = tmp_path / "interrupted"
    run_recipe(interrupted, "--stop_after_steps", "5")
    assert [s for s, _ in step_losses(interrupted)] == [1, 2, 3, 4, 5]
    run_recipe(interrupted, "--resume_from_checkpoint", "latest")
    resumed, uninterrupted = step_losses(interrupted), step_losses(tiny_run)
    assert [s for s, _ in resumed] == [s for s, _ in uninterrupted]
    torch.testing.assert_close(torch.tensor([l for _, l in resumed]), torch.tensor([l for _, l in uninterrupted]))


def test_resume_rejects_incomplete_checkpoint(tmp_path):
    (tmp_path / "checkpoint-3").mkdir()
    result = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "pretrain.py"), "--config", str(TINY), "--output_dir", str(tmp_path / "o"),
         "--resume_from_checkpoint", str(tmp_path / "checkpoint-3")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    assert "is not a complete checkpoint" in result.stderr


def test_unknown_config_key_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**yaml.safe_load(TINY.read_text()), "hidden_sise": 8}))
    result = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "pretrain.py"), "--config", str(bad), "--output_dir", str(tmp_path / "o")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0 and "unknown keys ['hidden_sise']" in result.stderr


def test_full_softmax_over_a_large_vocabulary_is_refused(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "pretrain.py"), "--config", str(TINY), "--output_dir", str(tmp_path / "o"),
         "--full_softmax", "true", "--full_softmax_max_items", "100"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    assert "--full_softmax scores all" in result.stderr and "--full_softmax_max_items (100)" in result.stderr
    assert not (tmp_path / "o" / "checkpoints").exists()


@pytest.mark.parametrize("batching", [
    ("--packing", "true"),  # token-budget batches: an even number of them, so no rank waits or repeats a user
    ("--packing", "false", "--group_by_length", "true"),  # every rank must draw the same length-grouped batches
    ("--item_optimizer", "rowwise_adagrad"),  # sparse item gradients, all-reduced by DDP like dense ones
], ids=["packed", "grouped", "sparse_items"])
def test_two_processes_sync_gradients_and_gather_metrics_once(tmp_path, shared_data_dir, batching, two_process_launcher):
    output_dir = tmp_path / "ddp"
    run_recipe(
        output_dir,
        "--max_eval_users", "199",  # odd on purpose: gather_for_metrics must drop the padding duplicate
        *batching,
        launcher=two_process_launcher,
        env={"ACCELERATE_USE_CPU": "1"},
    )
    results = json.loads((output_dir / "results.json").read_text())
    assert results["num_processes"] == 2 and results["packing"] == ("false" not in batching)
    checksums = results["parameter_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]  # ranks hold equal parameters after training
    assert results["test"]["num_users"] == 199  # every user counted exactly once


def test_sparse_item_optimizer_learns_and_resumes_exactly(tiny_run, tmp_path):
    flags = ("--item_optimizer", "rowwise_adagrad", "--item_learning_rate", "0.02")
    run_recipe(tmp_path / "uninterrupted", *flags)
    losses = step_losses(tmp_path / "uninterrupted")
    assert json.loads((tmp_path / "uninterrupted" / "results.json").read_text())["item_optimizer"] == "rowwise_adagrad"
    assert losses[-1][1] < losses[0][1] and losses != step_losses(tiny_run)  # it learns, and not as AdamW does
    run_recipe(tmp_path / "resumed", *flags, "--stop_after_steps", "5")
    run_recipe(tmp_path / "resumed", *flags, "--resume_from_checkpoint", "latest")  # the row accumulators come back
    torch.testing.assert_close(torch.tensor([l for _, l in step_losses(tmp_path / "resumed")]),
                               torch.tensor([l for _, l in losses]))


def test_vocabulary_free_mode_trains_hashed_tables_and_ranks_the_data_items(tmp_path):
    flags = ("--vocabulary_free", "true", "--num_hash_buckets", "65536", "--num_item_hash_tables", "2",
             "--item_hash_table_size", "500", "--full_softmax", "false")
    result = run_recipe(tmp_path, *flags)
    assert "Vocabulary-free: 3706 items hash to" in result.stderr  # the catalogue evaluation ranks
    vocab = json.loads((tmp_path / "model" / "pinfm_vocab.json").read_text())
    assert vocab["items"] == [] and vocab["num_hash_buckets"] == 65536  # no per-item file
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["item_vocab_size"] == 4 + 65536 and config["num_item_hash_tables"] == 2
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["test"]["num_users"] == 200 and results["test"]["hr@200"] > 0
    losses = step_losses(tmp_path)
    assert losses[-1][1] < losses[0][1]


def test_padded_batches_learn_like_packed_ones(tiny_run, tmp_path):
    padded = tmp_path / "padded"
    run_recipe(padded, "--eval_exclude_history", "true", "--packing", "false")
    results = json.loads((padded / "results.json").read_text())
    assert results["packing"] is False and results["per_device_train_batch_tokens"] is None
    losses = step_losses(padded)
    assert [s for s, _ in losses] == list(range(1, 9)) and losses[-1][1] < losses[0][1]
    # Other users per step (a token budget, not a row count), so other losses, of the same size
    packed_losses = [loss for _, loss in step_losses(tiny_run)]
    assert abs(losses[-1][1] - packed_losses[-1]) < 0.25 * packed_losses[-1]


BEST_FLAGS = ("--train_holdout", "2", "--eval_every_epochs", "1", "--load_best_model_at_end", "true",
              "--early_stopping_patience", "2", "--max_steps", "-1", "--num_train_epochs", "8", "--checkpointing_steps", "5")


def test_best_validation_epoch_is_tested_saved_and_survives_a_resume(tmp_path):
    from safetensors.torch import load_file

    straight = tmp_path / "straight"
    run_recipe(straight, *BEST_FLAGS)
    results = json.loads((straight / "results.json").read_text())
    valid = [(r["step"], r["valid/ndcg@10"]) for r in read_jsonl(straight / "train_log.jsonl") if "valid/ndcg@10" in r]
    best_step, best_value = max(valid, key=lambda sv: (sv[1], -sv[0]))  # the first of equal bests
    assert results["best_step"] == best_step and results["best_valid_ndcg@10"] == pytest.approx(best_value)
    assert results["steps"] < 8 * valid[0][0] or len(valid) == 8  # early stopping, unless it kept improving
    saved, best = load_file(straight / "model" / "model.safetensors"), load_file(straight / "best_model" / "model.safetensors")
    assert saved.keys() == best.keys() and all(torch.equal(saved[k], best[k]) for k in saved)
    card = (straight / "model" / "README.md").read_text()
    assert "all but each user's last two events" in card and f"best validation NDCG@10 (step {best_step})" in card
    if best_step != results["steps"]:  # the last step's weights were not the ones tested and saved
        last = load_file(sorted((straight / "checkpoints").glob("checkpoint-*"))[-1] / "model.safetensors")
        assert not all(torch.equal(saved[k], last[k]) for k in saved)

    resumed = tmp_path / "resumed"
    run_recipe(resumed, *BEST_FLAGS, "--stop_after_steps", str(valid[1][0] + 2))
    run_recipe(resumed, *BEST_FLAGS, "--resume_from_checkpoint", "latest")
    again = json.loads((resumed / "results.json").read_text())
    assert (again["best_step"], again["steps"]) == (results["best_step"], results["steps"])
    assert again["test"]["ndcg@10"] == pytest.approx(results["test"]["ndcg@10"], abs=0.005)


def test_choosing_the_epoch_on_in_sample_validation_is_refused(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "pretrain.py"), "--config", str(TINY), "--output_dir", str(tmp_path / "o"),
         "--eval_every_epochs", "1", "--load_best_model_at_end", "true", "--train_holdout", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0 and "--load_best_model_at_end chooses the epoch on validation" in result.stderr


def test_a_training_time_budget_stops_the_run_and_still_tests_and_saves_and_a_resume_trains_on(tiny_run, tmp_path):
    run_recipe(tmp_path, "--max_train_minutes", "0.0001")  # spent by the first step
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["steps"] == 1 and [s for s, _ in step_losses(tmp_path)] == [1]
    assert results["test"]["num_users"] == 200 and (tmp_path / "model" / "model.safetensors").is_file()
    assert list_checkpoints(tmp_path / "checkpoints")[-1].name == "checkpoint-1"
    # A new budget (here none) trains on from the step the budget stopped at, as if the run had not stopped.
    run_recipe(tmp_path, "--resume_from_checkpoint", "latest")
    resumed, uninterrupted = step_losses(tmp_path), step_losses(tiny_run)
    assert [s for s, _ in resumed] == [s for s, _ in uninterrupted]
    torch.testing.assert_close(torch.tensor([l for _, l in resumed]), torch.tensor([l for _, l in uninterrupted]))
    assert json.loads((tmp_path / "results.json").read_text())["steps"] == len(uninterrupted)


def test_the_contrastive_loss_is_trained_logged_and_carded_and_refused_without_dropout(tmp_path):
    run_recipe(tmp_path / "on", "--contrastive_loss_weight", "0.2", "--max_steps", "3")
    logged = [r for r in read_jsonl(tmp_path / "on" / "train_log.jsonl") if "loss" in r]
    assert len(logged) == 3 and all(r["contrastive_loss"] > 0 for r in logged)
    assert "contrastive" in (tmp_path / "on" / "model" / "README.md").read_text()
    result = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "pretrain.py"), "--config", str(TINY), "--output_dir", str(tmp_path / "off"),
         "--contrastive_loss_weight", "0.2", "--hidden_dropout_prob", "0", "--attention_dropout", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0 and "--contrastive_loss_weight compares two dropout passes" in result.stderr


def _prepared_slice(tmp_path: Path, data_dir: Path) -> Path:
    """The first 300 ML-1M users' events as an event file of one's own, and that file prepared on DuckDB."""
    pytest.importorskip("duckdb")
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pinfm_hf.data import load_dataset_by_name, prepare_events

    events = load_dataset_by_name("ml-1m", data_dir).table.select(["user_id", "item_id", "action", "timestamp"])
    users = pa.array(sorted(set(events["user_id"].to_pylist()))[:300])
    path = tmp_path / "events.parquet"
    pq.write_table(events.filter(pc.is_in(events["user_id"], value_set=users)), path)
    prepare_events(path, tmp_path / "prepared")
    return path


# Streamed from a prepared log: about 5 batches an epoch in one process, 3 in two, so that 8 steps cross an epoch and
# every kill below resumes mid-epoch (checkpoints every 2 steps).
STREAM_FLAGS = ("--per_device_train_batch_tokens", "8000", "--checkpointing_steps", "2", "--train_holdout", "2")


def _kill_at(step: int) -> dict:
    from pinfm_hf.checkpointing import FAULT_ENV

    return {FAULT_ENV: f"step@{step}"}


def test_prepared_events_stream_and_a_killed_run_resumes_exactly(tmp_path, shared_data_dir):
    _prepared_slice(tmp_path, shared_data_dir)
    prepared = ("--prepared", str(tmp_path / "prepared"), *STREAM_FLAGS)
    run_recipe(tmp_path / "uninterrupted", *prepared)
    results = json.loads((tmp_path / "uninterrupted" / "results.json").read_text())
    assert results["streaming"] is True and results["dataset"] == str(tmp_path / "prepared")
    losses = step_losses(tmp_path / "uninterrupted")
    assert [s for s, _ in losses] == list(range(1, 9)) and losses[-1][1] < losses[0][1]
    # Killed in step 8 (SIGKILL): checkpoint-6 is one batch into the second epoch; the resume reads that epoch's
    # stream again and skips the batch.
    killed = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "pretrain.py"), "--config", str(TINY), "--output_dir",
         str(tmp_path / "killed"), *prepared],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1", **_kill_at(8)},
    )
    assert killed.returncode != 0 and [s for s, _ in step_losses(tmp_path / "killed")] == list(range(1, 8))
    run_recipe(tmp_path / "killed", *prepared, "--resume_from_checkpoint", "latest")
    resumed = step_losses(tmp_path / "killed")
    assert [s for s, _ in resumed] == list(range(1, 9))
    torch.testing.assert_close(torch.tensor([l for _, l in resumed]), torch.tensor([l for _, l in losses]))


def test_prepared_events_in_two_processes_share_the_stream_and_resume_exactly(tmp_path, shared_data_dir, two_process_launcher):
    # The main process encodes the shards, the other reads the same files; each streams its own shards, the ranks keep
    # equal weights, count every test user once, and a run killed mid-epoch resumes to the same losses.
    _prepared_slice(tmp_path, shared_data_dir)
    launcher = two_process_launcher
    prepared = ("--prepared", str(tmp_path / "prepared"), "--max_eval_users", "199", *STREAM_FLAGS)
    run_recipe(tmp_path / "ddp", *prepared, launcher=launcher, env={"ACCELERATE_USE_CPU": "1"})
    results = json.loads((tmp_path / "ddp" / "results.json").read_text())
    checksums = results["parameter_checksums"]
    assert results["num_processes"] == 2 and results["streaming"] is True and len(checksums) == 2
    assert checksums[0] == checksums[1] and results["test"]["num_users"] == 199
    assert len(list((tmp_path / "prepared" / "cache").glob("train-*"))) == 1  # encoded once, shared
    # Killed in step 6 on both ranks: checkpoint-4 is one batch into the second epoch.
    command = [*launcher, str(ROOT / "recipes" / "pretrain.py"), "--config", str(TINY), "--output_dir",
               str(tmp_path / "killed"), *prepared, *DDP_TIMEOUT_FLAGS]
    killed = run_launched(command, timeout=600, env={"ACCELERATE_USE_CPU": "1", **_kill_at(6)})
    assert killed.returncode != 0 and [s for s, _ in step_losses(tmp_path / "killed")] == list(range(1, 6))
    run_recipe(tmp_path / "killed", *prepared, "--resume_from_checkpoint", "latest", launcher=launcher,
               env={"ACCELERATE_USE_CPU": "1"})
    resumed, uninterrupted = step_losses(tmp_path / "killed"), step_losses(tmp_path / "ddp")
    assert [s for s, _ in resumed] == list(range(1, 9))
    torch.testing.assert_close(torch.tensor([l for _, l in resumed]), torch.tensor([l for _, l in uninterrupted]))
    assert json.loads((tmp_path / "killed" / "results.json").read_text())["parameter_checksums"] == pytest.approx(checksums, rel=1e-5)
