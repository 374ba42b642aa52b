"""Folders saved before the redesign (pinfm-hf at cd208f5: training fields in the config, the next-item head's weights
at the top level) still load, and compute what the old code computed (`tests/fixtures/pinfm-0.1/expected.pt`)."""

import logging
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForPreTraining, AutoTokenizer

from pinfm_hf import PinFMConfig, PinFMForCTR, PinFMForPretraining, PinFMModel, PinFMTokenizer


LEGACY = Path(__file__).resolve().parent / "fixtures" / "pinfm-0.1"


@pytest.fixture(scope="module")
def expected():
    return torch.load(LEGACY / "expected.pt")


def test_old_config_loads_without_its_training_fields(caplog):
    with caplog.at_level(logging.WARNING):
        config = AutoConfig.from_pretrained(LEGACY / "pretraining")
    assert isinstance(config, PinFMConfig) and config.hidden_size == 8
    for name in ("num_negatives", "full_softmax", "initial_temperature", "positive_action_ids", "multi_token_loss_weight"):
        assert not hasattr(config, name), name
    assert "ignoring training field(s)" in caplog.text and "num_negatives" in caplog.text


def test_old_pretraining_folder_computes_what_it_did(expected, tmp_path):
    model = AutoModelForPreTraining.from_pretrained(LEGACY / "pretraining")
    assert isinstance(model, PinFMForPretraining) and model.has_item_counts
    with torch.no_grad():
        out = model(**expected["inputs"])
        scores = model.score_items(out.query_embeddings[:, -1])
    torch.testing.assert_close(out.query_embeddings, expected["query_embeddings"])
    torch.testing.assert_close(scores, expected["scores"])
    torch.testing.assert_close(model.temperature, expected["temperature"])
    # Saved again and reloaded (by the new code), it still computes the same; the encoder alone loads from it too.
    model.save_pretrained(tmp_path / "again")
    again = PinFMForPretraining.from_pretrained(tmp_path / "again")
    with torch.no_grad():
        torch.testing.assert_close(again(**expected["inputs"]).query_embeddings, expected["query_embeddings"])
    encoder = AutoModel.from_pretrained(LEGACY / "pretraining")
    assert isinstance(encoder, PinFMModel)
    torch.testing.assert_close(encoder(**expected["inputs"]).last_hidden_state, out.last_hidden_state)
    assert isinstance(AutoTokenizer.from_pretrained(LEGACY / "pretraining"), PinFMTokenizer)


def test_old_ctr_folder_keeps_its_auxiliary_head(expected):
    model = PinFMForCTR.from_pretrained(LEGACY / "ctr").eval()
    assert model.next_item_head is not None  # ctr_aux_loss_weight 0.5 in its config
    torch.testing.assert_close(model.next_item_head.query_proj.weight, expected["aux_query_weight"])
    with torch.no_grad():
        torch.testing.assert_close(model(**expected["ctr_inputs"]).logits, expected["ctr_logits"])
