"""A saved folder loads with `trust_remote_code=True` in a process that cannot import pinfm_hf."""

import json
import os
import subprocess
import sys
import textwrap

import pyarrow as pa
import torch

from pinfm_hf import PinFMConfig, PinFMForPretraining, PinFMTokenizer


# Prepended to a child's code: pinfm_hf (and pyarrow/datasets, which a bare transformers install lacks) are made
# unimportable before anything else, as in an environment with only torch and transformers.
WITHOUT_PINFM_HF = textwrap.dedent(
    """
    import importlib.abc, sys

    class BlockPinFM(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("pinfm_hf", "pyarrow", "datasets"):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by test)")
            return None

    sys.meta_path.insert(0, BlockPinFM())
    """
)
CHILD = WITHOUT_PINFM_HF + textwrap.dedent(
    """
    import json
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForPreTraining, AutoTokenizer

    folder = sys.argv[1]
    try:
        import pinfm_hf  # noqa: F401
        raise SystemExit("pinfm_hf should not be importable here")
    except ModuleNotFoundError:
        pass
    try:
        AutoConfig.from_pretrained(folder, trust_remote_code=False)
        raise SystemExit("loading without trust_remote_code should fail")
    except (ValueError, KeyError):
        pass
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    encoder = AutoModel.from_pretrained(folder, trust_remote_code=True)
    head = AutoModelForPreTraining.from_pretrained(folder, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    inputs = torch.load(folder + "/inputs.pt")
    with torch.no_grad():
        torch.save(
            {
                "last_hidden_state": encoder(**inputs).last_hidden_state,
                "query_embeddings": head(**inputs).query_embeddings,
            },
            folder + "/child_outputs.pt",
        )
    print(json.dumps({
        "config_class": type(config).__module__,
        "encoder_class": type(encoder).__name__,
        "head_class": type(head).__name__,
        "tokenizer_class": type(tokenizer).__name__,
        "ids": tokenizer.encode_events(["a", "unseen"], actions=["click", "buy"])["input_ids"],
        "pinfm_hf_imported": any(m.startswith("pinfm_hf") for m in sys.modules),
    }))
    """
)


def toy_tokenizer() -> PinFMTokenizer:
    return PinFMTokenizer.from_events(
        pa.table({"item_id": ["a", "b", "a"], "action": ["click", "buy", "click"]}), num_hash_buckets=16
    )


def load_in_child_without_package(folder, model, tokenizer) -> tuple[dict, object, dict]:
    """
    Save `model` and `tokenizer` to `folder` and load them with `trust_remote_code=True` in a child process where
    pinfm_hf, pyarrow and datasets cannot be imported. Returns the child's report, the parent's outputs on fixed
    inputs, and the child's outputs on the same inputs.
    """
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    inputs = {
        "input_ids": torch.tensor([[4, 5, 7, 0], [5, 4, 4, 6]]),
        "action_ids": torch.tensor([[2, 3, 2, 0], [3, 3, 2, 2]]),
        "timestamps": torch.tensor([[10, 20, 4000, 0], [1, 2, 3, 99999]]),
        "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]),
    }
    torch.save(inputs, folder / "inputs.pt")
    with torch.no_grad():
        expected = model(**inputs)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(folder / "modules_cache"), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(folder)], capture_output=True, text=True, env=env, cwd=folder, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return report, expected, torch.load(folder / "child_outputs.pt")


def test_trust_remote_code_load_without_package(tmp_path):
    torch.manual_seed(0)
    tokenizer = toy_tokenizer()
    config = PinFMConfig(
        item_vocab_size=len(tokenizer), action_vocab_size=tokenizer.action_vocab_size, hidden_size=32,
        num_attention_heads=2, num_hidden_layers=2,
    )
    model = PinFMForPretraining(config).eval()
    report, expected, child = load_in_child_without_package(tmp_path, model, tokenizer)

    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["auto_map"]["AutoModel"] == "modeling_pinfm.PinFMModel"
    for name in ("configuration_pinfm.py", "modeling_pinfm.py", "losses.py", "tokenization_pinfm.py"):
        assert (tmp_path / name).exists(), f"{name} not copied into the saved folder"
    assert report["config_class"].startswith("transformers_modules")
    assert report["encoder_class"] == "PinFMModel"
    assert report["head_class"] == "PinFMForPretraining"
    assert report["tokenizer_class"] == "PinFMTokenizer"
    assert report["ids"] == tokenizer.encode_events(["a", "unseen"], actions=["click", "buy"])["input_ids"]
    assert not report["pinfm_hf_imported"]
    torch.testing.assert_close(child["last_hidden_state"], expected.last_hidden_state)
    torch.testing.assert_close(child["query_embeddings"], expected.query_embeddings)


REFUSALS_CHILD = WITHOUT_PINFM_HF + textwrap.dedent(
    """
    import json
    from transformers import AutoModelForPreTraining, AutoTokenizer

    errors = {}
    for name, load in (("weights", AutoModelForPreTraining), ("tokenizer", AutoTokenizer)):
        try:
            load.from_pretrained(sys.argv[1], trust_remote_code=True)
            errors[name] = None
        except ValueError as e:
            errors[name] = str(e)
    print(json.dumps(errors))
    """
)


def test_remote_code_refuses_non_finite_weights_and_a_missing_vocabulary(tmp_path):
    """The load-time checks live in the copied files, so a child without pinfm_hf refuses the same corrupt folder."""
    from safetensors.torch import load_file, save_file

    tokenizer = toy_tokenizer()
    config = PinFMConfig(item_vocab_size=len(tokenizer), action_vocab_size=tokenizer.action_vocab_size, hidden_size=32,
                         num_attention_heads=2, num_hidden_layers=1)
    PinFMForPretraining(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "pinfm_vocab.json").unlink()
    weights = load_file(tmp_path / "model.safetensors")
    weights["pinfm.norm.weight"][0] = float("nan")
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules_cache"), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", REFUSALS_CHILD, str(tmp_path)], capture_output=True, text=True, env=env, cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    errors = json.loads(result.stdout.strip().splitlines()[-1])
    assert errors["weights"] == (
        f"{tmp_path / 'model.safetensors'} holds 1 non-finite (NaN/inf) tensor(s), e.g. `pinfm.norm.weight`: "
        "the checkpoint is corrupt."
    )
    assert errors["tokenizer"] is not None and "has no `pinfm_vocab.json`" in errors["tokenizer"]
