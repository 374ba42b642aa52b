"""CTR recipe checks on a slice of real ML-1M: end to end (full model and LoRA adapter), exact resume, the leakage
guard, and two processes with gradient sync."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForSequenceClassification

from pinfm_hf import PinFMForCTR, PinFMTokenizer
from pinfm_hf.data import CTRFeatureEncoder
from pinfm_hf.checkpointing import list_checkpoints
from pinfm_hf.tokenization_pinfm import SPECIAL_ITEM_TOKENS
from pinfm_hf.training_utils import read_jsonl
from pinfm_hf.transfer import load_ctr_adapters

from launched import DDP_TIMEOUT_FLAGS, run_launched


ROOT = Path(__file__).resolve().parents[1]
TINY_PRETRAIN = ROOT / "recipes" / "configs" / "tiny_test.yaml"
TINY_CTR = ROOT / "recipes" / "configs" / "ctr_tiny_test.yaml"
pytestmark = pytest.mark.slow


def run(script: str, config: Path, output_dir: Path, *extra: str, launcher: tuple[str, ...] = (), env: dict | None = None,
        check: bool = True) -> subprocess.CompletedProcess:
    command = [*launcher] if launcher else [sys.executable]
    command += [str(ROOT / "recipes" / script), "--config", str(config), "--output_dir", str(output_dir), *extra]
    command += DDP_TIMEOUT_FLAGS if launcher else ()
    result = run_launched(command, timeout=600, env=env)
    if check:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def step_losses(output_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_jsonl(output_dir / "train_log.jsonl") if "loss" in r]


@pytest.fixture(scope="module")
def base(tmp_path_factory, shared_data_dir) -> Path:
    """A tiny base pretrained on ML-1M events before the 0.9 time quantile (the CTR configs' cut)."""
    output_dir = tmp_path_factory.mktemp("base")
    run("pretrain.py", TINY_PRETRAIN, output_dir, "--time_cut_quantile", "0.9")
    return output_dir / "model"


@pytest.fixture(scope="module")
def full_run(base, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("full")
    run("finetune_ctr.py", TINY_CTR, output_dir, "--base", str(base))
    return output_dir


def test_full_transfer_end_to_end(full_run):
    losses = step_losses(full_run)
    assert [s for s, _ in losses] == list(range(1, 9))
    results = json.loads((full_run / "results.json").read_text())
    test = results["test"]
    assert test["num_samples"] == results["data"]["test_samples"] and 0 < test["auc"] < 1 and test["logloss"] > 0
    assert test["gauc_users"] + test["gauc_skipped_users"] > 0
    assert test["fresh/num_samples"] == results["data"]["test_fresh_samples"]  # the fresh-item slice is reported
    # Full transfer trains everything: the ranker holds no retrieval head unless its auxiliary loss is on.
    assert results["trainable_parameters"] == results["model_parameters"]
    model_dir = full_run / "model"
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    assert isinstance(model, PinFMForCTR) and model.config.ctr_feature_vocab_size > 0
    assert CTRFeatureEncoder.load(model_dir).slots == model.config.ctr_feature_slots
    card = ModelCard.load(model_dir / "README.md")
    assert {r.metric_type for r in card.data.eval_results} == {"auc", "gauc", "logloss"}
    assert f"{test['auc']:.4f}" in card.text and "like" in card.text
    assert (full_run / "training_curves.png").stat().st_size > 1000
    assert len(list_checkpoints(full_run / "checkpoints")) == 2


def test_lora_saves_a_small_adapter_that_reloads(base, tmp_path):
    output_dir = tmp_path / "lora"
    run("finetune_ctr.py", TINY_CTR, output_dir, "--base", str(base), "--transfer", "lora",
        "--ctr_history_field_match_features", "true")
    results = json.loads((output_dir / "results.json").read_text())
    assert results["trainable_parameters"] < results["model_parameters"] * 0.25
    adapter = output_dir / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "ctr_features.json").is_file()
    assert not (adapter / "model.safetensors").exists()  # an adapter, not a copy of the base
    model = load_ctr_adapters(base, {"like": adapter})
    assert model.active_adapter == "like"
    # The adapter carries its use case's item -> genre table (history matches by genre): the base's movies have
    # genres the encoder knows (a genre absent from the 2,000 training impressions stays unknown), buckets none.
    genres = model.get_base_model().ctr_item_features.modules_to_save["like"].item_feature_ids
    tokenizer = PinFMTokenizer.from_pretrained(base)
    assert (genres[len(SPECIAL_ITEM_TOKENS) : tokenizer.first_bucket_id] > 1).any(dim=1).float().mean() > 0.9
    assert not genres[tokenizer.first_bucket_id :].any() and not genres[: len(SPECIAL_ITEM_TOKENS)].any()
    assert ModelCard.load(adapter / "README.md").data.library_name == "peft"


def test_resume_gives_the_same_losses(base, full_run, tmp_path):
    interrupted = tmp_path / "interrupted"
    run("finetune_ctr.py", TINY_CTR, interrupted, "--base", str(base), "--stop_after_steps", "5")
    assert [s for s, _ in step_losses(interrupted)] == [1, 2, 3, 4, 5]
    run("finetune_ctr.py", TINY_CTR, interrupted, "--base", str(base), "--resume_from_checkpoint", "latest")
    resumed, uninterrupted = step_losses(interrupted), step_losses(full_run)
    assert [s for s, _ in resumed] == [s for s, _ in uninterrupted]
    torch.testing.assert_close(torch.tensor([l for _, l in resumed]), torch.tensor([l for _, l in uninterrupted]))


def test_a_base_that_saw_the_test_period_is_refused(base, tmp_path):
    result = run("finetune_ctr.py", TINY_CTR, tmp_path / "o", "--base", str(base), "--cut_quantile", "0.5", check=False)
    assert result.returncode != 0
    assert "leaked into pretraining" in result.stderr and "--time_cut_quantile 0.5" in result.stderr


def test_two_processes_sync_gradients_and_gather_metrics_once(base, tmp_path, two_process_launcher):
    output_dir = tmp_path / "ddp"
    run(
        "finetune_ctr.py", TINY_CTR, output_dir, "--base", str(base), "--deduplicate_histories", "true",
        # The cold-start switches too: item features in the candidate token, young-item dropout, random bucket ids.
        "--ctr_candidate_item_features", "true", "--ctr_young_item_dropout", "0.5", "--candidate_id_randomization", "0.2",
        launcher=two_process_launcher,
        env={"ACCELERATE_USE_CPU": "1"},
    )
    results = json.loads((output_dir / "results.json").read_text())
    assert results["num_processes"] == 2
    checksums = results["parameter_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    assert results["data"]["test_samples"] % 2 == 1  # odd on purpose: one rank gets a padding duplicate
    assert results["test"]["num_samples"] == results["data"]["test_samples"]  # gather_for_metrics dropped it


def test_early_stopping_tests_and_saves_the_best_validation_epoch(base, tmp_path):
    output_dir = tmp_path / "early"
    # A benchmark report whose figures for `like` go into the adapter's card (two seeds of two strategies, one peer).
    report = tmp_path / "ctr_transfer.json"
    report.write_text(json.dumps({"ml-1m/like": {
        "rows": [{"strategy": s, "seed": k, "auc": auc, "gauc": 0.7, "logloss": 0.5, "trainable_share": share}
                 for s, share, aucs in (("none", 0.98, (0.70, 0.72)), ("lora", 0.04, (0.75, 0.76))) for k, auc in enumerate(aucs)],
        "peers": [{"name": "lightgbm", "seed": 0, "auc": 0.74, "gauc": 0.69, "logloss": 0.52}],
    }}))
    run(
        "finetune_ctr.py", TINY_CTR, output_dir, "--base", str(base), "--transfer", "lora", "--ctr_item_bias", "true",
        "--validation_cut_quantile", "0.85", "--max_validation_samples", "400", "--max_train_samples", "640",
        "--max_steps", "-1", "--num_train_epochs", "4", "--eval_every_epochs", "1", "--load_best_model_at_end", "true",
        "--early_stopping_patience", "1", "--learning_rate", "0.05", "--card_comparison", str(report),
    )
    results = json.loads((output_dir / "results.json").read_text())
    assert results["data"]["validation_samples"] >= 400
    validations = [(r["step"], r["valid/auc"]) for r in read_jsonl(output_dir / "train_log.jsonl") if "valid/auc" in r]
    best = max(range(len(validations)), key=lambda i: (validations[i][1], -i))  # the first of equal bests
    assert (results["best_step"], results["best_valid_auc"]) == validations[best]
    # Patience 1: training stops at the first validation that is not better, or runs out of epochs.
    assert len(validations) == 4 or best == len(validations) - 2
    # The saved adapter holds the best validation's weights (the ones tested), not the last step's.
    from safetensors.torch import load_file

    saved = load_file(output_dir / "adapter" / "adapter_model.safetensors")
    best_weights = load_file(output_dir / "best_model" / "model.safetensors")
    torch.testing.assert_close(
        saved["base_model.model.ctr_item_bias.weight"],
        best_weights["base_model.model.ctr_item_bias.modules_to_save.default.weight"], rtol=0, atol=0,
    )
    assert saved["base_model.model.ctr_item_bias.weight"].abs().sum() > 0
    card = (output_dir / "adapter" / "README.md").read_text()
    assert f"best validation AUC ({results['best_valid_auc']:.4f}" in card
    assert "| lora | 2 | 0.7550 +- 0.0071 |" in card and "| none | 2 | 0.7100 +- 0.0141 |" in card
    assert "| peer: lightgbm | 1 | 0.7400 +- 0.0000 |" in card
