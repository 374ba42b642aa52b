"""Run folders and checkpoints: one run per folder, complete checkpoints only, fallback past damaged ones."""

import json
import os
import subprocess
import sys

import pytest
import torch
from accelerate import Accelerator

from pinfm_hf.checkpointing import (
    LoopPosition,
    RunFolder,
    RunFolderError,
    TrainingDivergedError,
    check_finite_step,
    list_checkpoints,
    verify_checkpoint,
)


@pytest.fixture
def trainer():
    """A prepared tiny model and optimizer: what the recipes checkpoint."""
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model, optimizer


def train_step(model, optimizer) -> None:
    model(torch.randn(8, 4)).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def save_steps(run, trainer, steps, keep_last=5):
    accelerator, model, optimizer = trainer
    for step in steps:
        train_step(model, optimizer)
        run.save_checkpoint(accelerator, model, LoopPosition(step=step, micro_step=step), keep_last)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_checkpoints_carry_a_manifest_and_resume_exactly(tmp_path, trainer):
    accelerator, model, _ = trainer
    run = RunFolder(tmp_path)
    run.claim()
    saved = save_steps(run, trainer, [1, 2])
    state = json.loads((tmp_path / "checkpoints" / "checkpoint-2" / "training_state.json").read_text())
    assert state["run_id"] == run.run_id and state["step"] == 2
    assert "model.safetensors" in state["files"] and len(state["files"]["model.safetensors"]["sha256"]) == 64
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    run.release()
    resumed = RunFolder(tmp_path)
    resumed.claim(resume_from_checkpoint="latest")
    position = resumed.resume(accelerator, model, "latest")
    assert position == LoopPosition(step=2, micro_step=2) and resumed.run_id == run.run_id
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, saved[name])


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda c: (c / "model.safetensors").write_bytes((c / "model.safetensors").read_bytes()[:40]), "model.safetensors has 40 bytes"),
        (lambda c: (c / "training_state.json").write_text('{"step": 3, "fi'), "no readable training_state.json"),
        (lambda c: (c / "optimizer.bin").unlink(), "misses optimizer.bin"),
        (lambda c: (c / "model.safetensors").write_bytes(bytes(reversed((c / "model.safetensors").read_bytes()))), "SHA-256"),
    ],
    ids=["truncated_weights", "truncated_state", "missing_optimizer", "corrupted_weights"],
)
def test_latest_falls_back_past_a_damaged_checkpoint(tmp_path, trainer, caplog, damage, problem):
    accelerator, model, _ = trainer
    run = RunFolder(tmp_path)
    run.claim()
    save_steps(run, trainer, [1])
    at_step_1 = {name: p.detach().clone() for name, p in model.named_parameters()}
    save_steps(run, trainer, [2])
    newest = tmp_path / "checkpoints" / "checkpoint-2"
    damage(newest)
    assert problem in verify_checkpoint(newest)
    run.release()
    resumed = RunFolder(tmp_path)
    resumed.claim(resume_from_checkpoint="latest")
    position = resumed.resume(accelerator, model, "latest")
    assert position.step == 1
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, at_step_1[name])
    with pytest.raises(ValueError, match=f"Cannot resume from {newest}: it .*{problem.split()[0]}"):
        resumed.resume(accelerator, model, str(newest))  # a checkpoint named explicitly is not silently replaced


def test_no_loadable_checkpoint_is_an_error_not_a_fresh_start(tmp_path, trainer):
    accelerator, model, _ = trainer
    run = RunFolder(tmp_path)
    run.claim()
    save_steps(run, trainer, [1])
    (tmp_path / "checkpoints" / "checkpoint-1" / "model.safetensors").write_bytes(b"")
    with pytest.raises(RunFolderError, match="No loadable checkpoint .*checkpoint-1 model.safetensors has 0 bytes"):
        run.resume(accelerator, model, "latest")
    assert RunFolder(tmp_path / "empty").resume(accelerator, model, "latest") is None  # nothing written yet: fresh


def test_non_finite_weights_are_never_checkpointed_and_never_resumed(tmp_path, trainer, monkeypatch):
    import pinfm_hf.checkpointing as checkpointing

    accelerator, model, _ = trainer
    run = RunFolder(tmp_path)
    run.claim()
    save_steps(run, trainer, [1])
    at_step_1 = {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(TrainingDivergedError, match="1 parameter tensor.* NaN or infinity at step 2 .*first: weight"):
        run.save_checkpoint(accelerator, model, LoopPosition(step=2), 5)
    assert [c.name for c in list_checkpoints(tmp_path / "checkpoints")] == ["checkpoint-1"]
    # A whole checkpoint of NaN weights (as an older version could write) is skipped like a damaged one.
    monkeypatch.setattr(checkpointing, "check_finite_parameters", lambda *args, **kwargs: None)
    run.save_checkpoint(accelerator, model, LoopPosition(step=2), 5)
    position = run.resume(accelerator, model, "latest")
    assert position.step == 1
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, at_step_1[name])


def test_a_checkpoint_with_a_non_finite_buffer_is_skipped_too(tmp_path):
    # A float buffer (the item popularity the losses read) is state like a weight: a NaN there must not be resumed.
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 3)
    model.register_buffer("popularity", torch.zeros(3))
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=0.1))
    run = RunFolder(tmp_path)
    run.claim()
    run.save_checkpoint(accelerator, model, LoopPosition(step=1), 5)
    with torch.no_grad():
        model.popularity[0] = float("nan")
    with pytest.raises(TrainingDivergedError, match="first: popularity"):
        run.save_checkpoint(accelerator, model, LoopPosition(step=2), 5)
    assert run.resume(accelerator, model, "latest").step == 1 and torch.isfinite(model.popularity).all()


def test_check_finite_step_names_the_step_and_the_last_good_checkpoint():
    check_finite_step(3, {"loss": 1.5}, 2.0, None)  # finite: nothing happens
    with pytest.raises(TrainingDivergedError, match="diverged at step 7: loss = nan.*last good checkpoint is /x/checkpoint-5"):
        check_finite_step(7, {"loss": float("nan")}, 1.0, "/x/checkpoint-5")
    with pytest.raises(TrainingDivergedError, match="grad_norm = inf.*no checkpoint was written yet"):
        check_finite_step(1, {"loss": 2.0}, float("inf"), None)


def test_fresh_run_refuses_a_folder_with_another_runs_outputs(tmp_path, trainer):
    old = RunFolder(tmp_path)
    old.claim()
    save_steps(old, trainer, [14, 15, 16])
    old.release()
    with pytest.raises(RunFolderError, match=r"holds the outputs of another run \(checkpoints\).*--resume_from_checkpoint latest.*--overwrite_output_dir true"):
        RunFolder(tmp_path).claim()
    new = RunFolder(tmp_path)
    new.claim(overwrite_output_dir=True)
    assert not (tmp_path / "checkpoints").exists()
    save_steps(new, trainer, [1, 2, 3], keep_last=2)
    assert [c.name for c in list_checkpoints(tmp_path / "checkpoints")] == ["checkpoint-2", "checkpoint-3"]


def test_rotation_deletes_only_checkpoints_of_this_run(tmp_path, trainer):
    old = RunFolder(tmp_path)
    old.claim()
    save_steps(old, trainer, [16])
    old.release()
    resumed = RunFolder(tmp_path)
    resumed.claim(resume_from_checkpoint="latest")
    # Another run's checkpoint appears beside it (e.g. copied in): it is refused, never rotated away.
    foreign = tmp_path / "checkpoints" / "checkpoint-20"
    foreign.mkdir()
    (foreign / "training_state.json").write_text(json.dumps({"run_id": "someone-else", "step": 20}))
    resumed.release()
    with pytest.raises(RunFolderError, match=r"checkpoints/checkpoint-20.*--overwrite_output_dir true to delete them"):
        RunFolder(tmp_path).claim(resume_from_checkpoint=str(tmp_path / "checkpoints" / "checkpoint-16"))
    run = RunFolder(tmp_path)
    run.run_id = "this-run"
    save_steps(run, trainer, [17, 18, 19], keep_last=1)
    assert [c.name for c in list_checkpoints(tmp_path / "checkpoints")] == ["checkpoint-16", "checkpoint-19", "checkpoint-20"]


def test_a_second_run_on_the_same_folder_is_refused_naming_the_holder(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pinfm_hf.checkpointing import RunFolder; "
         "run = RunFolder(sys.argv[1]); run.claim(); print('held', flush=True); time.sleep(60)", str(tmp_path)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderError, match=rf"{tmp_path} is in use by another run \(pid {holder.pid} on "):
            RunFolder(tmp_path).claim()
    finally:
        holder.kill()
        holder.wait()
    RunFolder(tmp_path).claim(resume_from_checkpoint="latest")  # the OS released the lock of the killed holder


def test_output_dir_that_is_a_file_is_refused_first(tmp_path):
    path = tmp_path / "taken"
    path.write_text("x")
    with pytest.raises(RunFolderError, match="is a file, not a folder"):
        RunFolder(path).claim()


def test_saved_files_keep_the_umask_mode(tmp_path, trainer):
    from pinfm_hf.io_utils import atomic_folder, atomic_write_json

    old = os.umask(0o022)
    try:
        run = RunFolder(tmp_path / "run")
        run.claim()
        save_steps(run, trainer, [1])
        with atomic_folder(tmp_path / "model") as folder:
            torch.save({}, folder / "weights.bin")
            os.chmod(folder / "weights.bin", 0o600)  # as a library writing through a private temporary file does
        atomic_write_json(tmp_path / "results.json", {"loss": float("nan")})
    finally:
        os.umask(old)
    for path in [tmp_path / "model" / "weights.bin", tmp_path / "results.json", *(tmp_path / "run" / "checkpoints").rglob("*.*")]:
        assert path.stat().st_mode & 0o777 == 0o644, path
    assert json.loads((tmp_path / "results.json").read_text()) == {"loss": None}
