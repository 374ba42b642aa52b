"""
Model hub life cycle against a loopback hub (tests/hub_server.py): push from the recipes, load by repo id and
revision in fresh processes (with and without pinfm_hf), private repos, missing revisions, adapters naming their base.

Every hub call runs in a child process: `huggingface_hub` reads `HF_ENDPOINT` at import time.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, constants
from transformers import pipeline

from hub_server import LoopbackHub
from pinfm_hf import PinFMForCTR, PinFMForPretraining
from pinfm_hf.hub import cached_file_from
from pinfm_hf.transfer import load_ctr_adapters, load_ctr_config
from test_remote_code import WITHOUT_PINFM_HF


ROOT = Path(__file__).resolve().parents[1]
TINY_PRETRAIN = ROOT / "recipes" / "configs" / "tiny_test.yaml"
TINY_CTR = ROOT / "recipes" / "configs" / "ctr_tiny_test.yaml"
BASE_REPO = "pinfm-test/tiny-ml1m"
ADAPTER_REPO = "pinfm-test/tiny-ml1m-like"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    # The suite runs with HF_HUB_OFFLINE=1 (no internet); the loopback hub is on this machine, and in-process
    # `HfApi(endpoint=...)` calls must reach it.
    with pytest.MonkeyPatch.context() as patch, LoopbackHub(tmp_path_factory.mktemp("hub")) as server:
        patch.setattr(constants, "HF_HUB_OFFLINE", False)
        patch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
        yield server


def hub_env(hub: LoopbackHub, home: Path, *, token: bool = True) -> dict:
    """A child's environment: the loopback endpoint, its own hub cache, the token only when asked."""
    return {k: v for k, v in hub.child_env(home, token=token).items() if k != "PYTHONPATH"}


def run_recipe(script: str, config: Path, output_dir: Path, env: dict, *extra: str, check: bool = True):
    command = [sys.executable, str(ROOT / "recipes" / script), "--config", str(config), "--output_dir", str(output_dir), *extra]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    if check:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def run_child(code: str, env: dict, cwd: Path, *, without_pinfm_hf: bool = False) -> dict:
    """Run `code` in a fresh interpreter; it prints one JSON line last, which is returned."""
    source = (WITHOUT_PINFM_HF if without_pinfm_hf else "") + textwrap.dedent(code)
    result = subprocess.run([sys.executable, "-c", source], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def history_inputs(config, batch_size: int = 3, length: int = 6) -> dict:
    generator = torch.Generator().manual_seed(0)
    first_item, num_items = config.num_special_item_tokens, 50
    return {
        "input_ids": torch.randint(first_item, first_item + num_items, (batch_size, length), generator=generator),
        "action_ids": torch.randint(2, config.action_vocab_size, (batch_size, length), generator=generator),
        "timestamps": torch.cumsum(torch.randint(1, 10_000, (batch_size, length), generator=generator), dim=1),
        "attention_mask": torch.ones(batch_size, length, dtype=torch.long),
    }


def ctr_inputs(config) -> dict:
    """A batch for PinFMForCTR: history + candidate (marked with the candidate action) + side features."""
    inputs = history_inputs(config)
    inputs["action_ids"][:, -1] = config.candidate_action_id
    if config.ctr_feature_vocab_size:
        slots = sum(config.ctr_feature_slots)
        inputs["side_feature_ids"] = torch.randint(1, config.ctr_feature_vocab_size, (3, slots), generator=torch.Generator().manual_seed(1))
    return inputs


@pytest.fixture(scope="module")
def pushed_base(hub, tmp_path_factory) -> dict:
    """A tiny base pretrained before the CTR cut and pushed by the recipe."""
    output_dir = tmp_path_factory.mktemp("base")
    env = hub_env(hub, tmp_path_factory.mktemp("home"))
    result = run_recipe("pretrain.py", TINY_PRETRAIN, output_dir, env, "--time_cut_quantile", "0.9",
                        "--push_to_hub", "true", "--hub_model_id", BASE_REPO)
    return {"output_dir": output_dir, "logs": result.stdout + result.stderr}


def test_pretrain_pushes_weights_code_tokenizer_card_and_metrics(pushed_base, hub, tmp_path):
    api = HfApi(endpoint=hub.endpoint, token=hub.token)
    files = set(api.list_repo_files(BASE_REPO))
    expected = {"config.json", "model.safetensors", "configuration_pinfm.py", "modeling_pinfm.py", "tokenization_pinfm.py",
                "tokenizer_config.json", "README.md", "training/results.json", "training/train_log.jsonl",
                "training/training_curves.png"}
    assert expected <= files, expected - files
    assert not any(f.startswith("checkpoints/") for f in files)  # resumable state stays with the run
    local = pushed_base["output_dir"] / "model"
    for path in (p for p in local.rglob("*") if p.is_file()):  # the saved folder, byte for byte
        name = str(path.relative_to(local))
        assert name in files, name
        assert Path(api.hf_hub_download(BASE_REPO, name, local_dir=tmp_path / "download")).read_bytes() == path.read_bytes()
    card = ModelCard.load(tmp_path / "download" / "README.md")
    assert card.data.model_name == BASE_REPO and card.data.library_name == "transformers"
    assert {r.metric_type for r in card.data.eval_results} >= {"ndcg@10", "hr@10"}
    assert f'"{BASE_REPO}"' in card.text  # the loading snippet names the repo
    # The token never shows up in logs or pushed files.
    assert hub.token not in pushed_base["logs"]
    assert not any(hub.token.encode() in p.read_bytes() for p in pushed_base["output_dir"].rglob("*") if p.is_file())


LOAD_BASE = """
import json, os, sys
import torch
from transformers import AutoModel, AutoModelForPreTraining, AutoTokenizer, pipeline

revision = {revision!r}
tokenizer = AutoTokenizer.from_pretrained("{repo}", revision=revision, trust_remote_code=True)
encoder = AutoModel.from_pretrained("{repo}", revision=revision, trust_remote_code=True)
head = AutoModelForPreTraining.from_pretrained("{repo}", revision=revision, trust_remote_code=True)
inputs = torch.load("inputs.pt")
with torch.no_grad():
    torch.save({{"last_hidden_state": encoder(**inputs).last_hidden_state, "query": head(**inputs).query_embeddings}},
               "outputs.pt")
recommend = pipeline(model="{repo}", revision=revision, trust_remote_code=True)
history = [{{"item_id": "Heat (1995)", "action": "rating_4", "timestamp": 1}}]
if os.path.exists("history.json"):
    history = json.load(open("history.json"))
print(json.dumps({{"pinfm_hf": any(m.startswith("pinfm_hf") for m in sys.modules), "class": type(head).__module__,
                  "vocab": len(tokenizer), "recommendations": recommend(history, top_k=5)}}))
"""


def test_load_by_repo_id_in_a_fresh_process_gives_identical_outputs(pushed_base, hub, tmp_path):
    local = PinFMForPretraining.from_pretrained(pushed_base["output_dir"] / "model")
    inputs = history_inputs(local.config)
    torch.save(inputs, tmp_path / "inputs.pt")
    with torch.no_grad():
        expected = local(**inputs)
    history = [{"item_id": "Toy Story (1995)", "action": "rating_5", "timestamp": 978300760},
               {"item_id": "Aladdin (1992)", "action": "rating_4", "timestamp": 978302109}]
    (tmp_path / "history.json").write_text(json.dumps(history))
    env = hub_env(hub, tmp_path / "home")
    report = run_child(LOAD_BASE.format(repo=BASE_REPO, revision=None), env, tmp_path, without_pinfm_hf=True)
    assert not report["pinfm_hf"] and report["class"].startswith("transformers_modules")
    assert report["vocab"] == local.config.item_vocab_size
    # The recommendation pipeline comes with the repo too, and recommends what the local folder does.
    expected_recommendations = pipeline("pinfm-recommendation", model=str(pushed_base["output_dir"] / "model"))(history, top_k=5)
    assert len(report["recommendations"]) == 5
    assert [r["item_id"] for r in report["recommendations"]] == [r["item_id"] for r in expected_recommendations]
    torch.testing.assert_close(torch.tensor([r["score"] for r in report["recommendations"]]),
                               torch.tensor([r["score"] for r in expected_recommendations]))
    outputs = torch.load(tmp_path / "outputs.pt")
    assert torch.equal(outputs["last_hidden_state"], expected.last_hidden_state)
    assert torch.equal(outputs["query"], expected.query_embeddings)


PUSH_FOLDER = """
import json, sys
from pinfm_hf.hub import push_folder
url = push_folder(sys.argv[1], sys.argv[2], revision=sys.argv[3] if sys.argv[3] != "-" else None,
                  private=sys.argv[4] == "private")
print(json.dumps({"url": url}))
"""


def push(folder: Path, repo: str, env: dict, cwd: Path, *, revision: str = "-", private: bool = False) -> None:
    result = subprocess.run(
        [sys.executable, "-c", PUSH_FOLDER, str(folder), repo, revision, "private" if private else "public"],
        cwd=cwd, capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]


LOAD_ERROR = """
import json
import os
from transformers import AutoModel
try:
    AutoModel.from_pretrained("{repo}", revision={revision!r}, trust_remote_code=True)
    print(json.dumps({{"error": None}}))
except Exception as e:
    print(json.dumps({{"error": f"{{type(e).__name__}}: {{e}}"}}))
"""


def test_revisions_load_their_own_weights_and_a_missing_one_fails_clearly(pushed_base, hub, tmp_path):
    # A second version on branch "retrained": other weights, same repo; main must stay as it was.
    local = PinFMForPretraining.from_pretrained(pushed_base["output_dir"] / "model")
    with torch.no_grad():
        for p in local.parameters():
            p.add_(0.01)
    local.save_pretrained(tmp_path / "retrained")
    env = hub_env(hub, tmp_path / "home")
    push(tmp_path / "retrained", BASE_REPO, env, tmp_path, revision="retrained")
    inputs = history_inputs(local.config)
    torch.save(inputs, tmp_path / "inputs.pt")
    outputs = {}
    for revision in (None, "retrained"):
        run_child(LOAD_BASE.format(repo=BASE_REPO, revision=revision), env, tmp_path)
        outputs[revision] = torch.load(tmp_path / "outputs.pt")["query"]
    with torch.no_grad():
        retrained = local(**inputs).query_embeddings
        original = PinFMForPretraining.from_pretrained(pushed_base["output_dir"] / "model")(**inputs).query_embeddings
    assert torch.equal(outputs["retrained"], retrained)
    assert torch.equal(outputs[None], original) and not torch.equal(original, retrained)

    error = run_child(LOAD_ERROR.format(repo=BASE_REPO, revision="no-such-branch"), env, tmp_path)["error"]
    assert error is not None and "no-such-branch" in error and "not a valid git identifier" in error


def test_private_repo_without_a_token_fails_clearly(pushed_base, hub, tmp_path):
    repo = "pinfm-test/private-tiny"
    env = hub_env(hub, tmp_path / "home")
    push(pushed_base["output_dir"] / "model", repo, env, tmp_path, private=True)
    anonymous = hub_env(hub, tmp_path / "anonymous", token=False)
    error = run_child(LOAD_ERROR.format(repo=repo, revision=None), anonymous, tmp_path)["error"]
    assert error is not None and repo in error and "private" in error and "token" in error
    assert run_child(LOAD_ERROR.format(repo=repo, revision=None), env, tmp_path)["error"] is None
    # A recipe taking that model says the same, before any training.
    result = run_recipe("finetune_ctr.py", TINY_CTR, tmp_path / "ctr", anonymous, "--base", repo, check=False)
    assert result.returncode != 0 and repo in result.stderr and "private" in result.stderr


def test_pushing_without_a_token_is_refused_clearly(pushed_base, hub, tmp_path):
    anonymous = hub_env(hub, tmp_path / "anonymous", token=False)
    result = subprocess.run(
        [sys.executable, "-c", PUSH_FOLDER, str(pushed_base["output_dir"] / "model"), "pinfm-test/no-token", "-", "public"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=anonymous,
    )
    assert result.returncode != 0 and "PermissionError" in result.stderr and "HF_TOKEN" in result.stderr


@pytest.mark.parametrize("token", [None, "hf_not_the_right_token"], ids=["no_token", "rejected_token"])
def test_a_push_that_cannot_succeed_fails_before_any_data_is_read(hub, tmp_path, token):
    env = hub_env(hub, tmp_path / "home", token=False)
    if token:
        env["HF_TOKEN"] = token
    result = run_recipe("pretrain.py", TINY_PRETRAIN, tmp_path / "run", env, "--push_to_hub", "true",
                        "--hub_model_id", "pinfm-test/never", check=False)
    assert result.returncode != 0 and "PermissionError" in result.stderr
    assert ("needs a hub token" if token is None else "rejected the token (HTTP 401)") in result.stderr
    assert "Events:" not in result.stderr and not (tmp_path / "run" / "train_log.jsonl").exists()  # no data was read


def test_adapter_push_with_a_local_base_is_refused(pushed_base, hub, tmp_path):
    env = hub_env(hub, tmp_path / "home")
    result = run_recipe("finetune_ctr.py", TINY_CTR, tmp_path / "ctr", env, "--base", str(pushed_base["output_dir"] / "model"),
                        "--transfer", "lora", "--push_to_hub", "true", "--hub_model_id", "pinfm-test/x", check=False)
    assert result.returncode != 0 and "needs --base to be a hub repo id" in result.stderr


PEFT_WITHOUT_PINFM_HF = """
import json
import os
import torch
from huggingface_hub import hf_hub_download
from peft import PeftModel
from transformers import AutoConfig, AutoModelForSequenceClassification

# The adapter repo holds the CTR config its base must be built with (head shape, side features).
config_class = type(AutoConfig.from_pretrained("{base}", trust_remote_code=True))
config = config_class.from_json_file(hf_hub_download("{adapter}", "pinfm_ctr_config.json"))
base = AutoModelForSequenceClassification.from_pretrained("{base}", config=config, trust_remote_code=True)
model = PeftModel.from_pretrained(base, "{adapter}").eval()
with torch.no_grad():
    torch.save(model(**torch.load("ctr_inputs.pt")).logits, "peft_logits.pt")
print(json.dumps({{"active": model.active_adapter}}))
"""

ADAPTERS_WITH_PINFM_HF = """
import json
import os
import torch
from pinfm_hf.data import FEATURES_FILE_NAME, CTRFeatureEncoder
from pinfm_hf.hub import cached_file_from
from pinfm_hf.transfer import load_ctr_adapters

model = load_ctr_adapters("{base}", {{"like": "{adapter}"}})
with torch.no_grad():
    torch.save(model(**torch.load("ctr_inputs.pt")).logits, "pinfm_logits.pt")
print(json.dumps({{"feature_slots": CTRFeatureEncoder.load(cached_file_from("{adapter}", FEATURES_FILE_NAME)).slots}}))
"""


def test_adapter_life_cycle_fine_tune_from_repo_push_and_score(pushed_base, hub, tmp_path):
    env = hub_env(hub, tmp_path / "home")
    output_dir = tmp_path / "like"
    run_recipe("finetune_ctr.py", TINY_CTR, output_dir, env, "--base", BASE_REPO, "--transfer", "lora",
               "--push_to_hub", "true", "--hub_model_id", ADAPTER_REPO)
    api = HfApi(endpoint=hub.endpoint, token=hub.token)
    adapter_config = json.loads(Path(api.hf_hub_download(ADAPTER_REPO, "adapter_config.json", local_dir=tmp_path / "a")).read_text())
    assert adapter_config["base_model_name_or_path"] == BASE_REPO  # the adapter names its base by repo id
    card = ModelCard.load(api.hf_hub_download(ADAPTER_REPO, "README.md", local_dir=tmp_path / "a"))
    assert card.data.library_name == "peft" and card.data.base_model == BASE_REPO
    assert {"adapter_model.safetensors", "ctr_features.json", "pinfm_ctr_config.json", "training/results.json"} <= set(
        api.list_repo_files(ADAPTER_REPO)
    )

    # What was trained, scored locally ...
    local_adapter = output_dir / "adapter"
    config = load_ctr_config(local_adapter)
    inputs = ctr_inputs(config)
    torch.save(inputs, tmp_path / "ctr_inputs.pt")
    base_model = PinFMForCTR.from_pretrained(pushed_base["output_dir"] / "model", config=config)
    with torch.no_grad():
        expected = load_ctr_adapters(None, {"like": local_adapter}, base_model=base_model)(**inputs).logits
    # ... equals the pushed adapter on the pushed base: plain PEFT without pinfm_hf, and pinfm_hf's loader.
    run_child(PEFT_WITHOUT_PINFM_HF.format(base=BASE_REPO, adapter=ADAPTER_REPO), env, tmp_path, without_pinfm_hf=True)
    report = run_child(ADAPTERS_WITH_PINFM_HF.format(base=BASE_REPO, adapter=ADAPTER_REPO), env, tmp_path)
    assert torch.equal(torch.load(tmp_path / "peft_logits.pt"), expected)
    assert torch.equal(torch.load(tmp_path / "pinfm_logits.pt"), expected)
    assert report["feature_slots"] == config.ctr_feature_slots


def test_cached_file_from_names_what_is_missing(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "a.json").write_text("{}")
    assert cached_file_from(tmp_path / "model", "a.json") == tmp_path / "model" / "a.json"
    with pytest.raises(FileNotFoundError, match="has no 'b.json'"):
        cached_file_from(tmp_path / "model", "b.json")
    with pytest.raises(FileNotFoundError, match="'a.json': .*nowhere' is neither a folder nor a hub repo id"):
        cached_file_from(tmp_path / "nowhere", "a.json")


def test_a_model_flag_that_is_neither_a_folder_nor_a_repo_id_is_named(tmp_path):
    from pinfm_hf.hub import check_model_reference

    with pytest.raises(FileNotFoundError, match=r"--base '.*missing/model': no such folder, and not a hub repo id"):
        check_model_reference(str(tmp_path / "missing" / "model"), flag="--base")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="--model .* is a folder without config.json"):
        check_model_reference(tmp_path / "empty", flag="--model")
    check_model_reference("org/pinfm-base", flag="--base")  # a repo id: checked when it is loaded
    result = run_recipe("finetune_ctr.py", TINY_CTR, tmp_path / "ctr", dict(os.environ, HF_HUB_OFFLINE="1"),
                        "--base", str(tmp_path / "missing" / "model"), check=False)
    assert result.returncode != 0 and "--base" in result.stderr and "no such folder" in result.stderr
    assert "CTR data" not in result.stderr  # refused before the data was read
