"""Row-wise int8/int4 item embedding tables for serving: accuracy, size, save/load, training refusal, remote code."""

import json

import pytest
import torch
from torch import nn
from transformers import AutoModel

from pinfm_hf import PinFMConfig, PinFMForCTR, PinFMForPretraining, PinFMModel
from pinfm_hf.quantization_pinfm import PinFMQuantizedEmbedding, packed_row_bytes, quantized_table_bytes

from test_remote_code import load_in_child_without_package, toy_tokenizer


VOCAB, ACTIONS, HIDDEN = 50, 6, 32


def make_config(**overrides) -> PinFMConfig:
    defaults = dict(item_vocab_size=VOCAB, action_vocab_size=ACTIONS, hidden_size=HIDDEN, num_hidden_layers=2,
                    num_attention_heads=2, intermediate_size=37)
    return PinFMConfig(**{**defaults, **overrides})


def make_inputs(batch_size: int = 5, length: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch_size, length, dtype=torch.long)
    mask[0, 4:] = 0  # a right-padded short row
    return {
        "input_ids": torch.randint(4, VOCAB, (batch_size, length), generator=g) * mask,
        "action_ids": torch.randint(2, ACTIONS, (batch_size, length), generator=g) * mask,
        "timestamps": (1_000_000_000 + torch.randint(0, 10_000, (batch_size, length), generator=g).cumsum(1)) * mask,
        "attention_mask": mask,
    }


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approx - exact).norm() / exact.norm())


# Rounding to the nearest of 2**b levels over each row's range R errs by R / (2**b - 1) / sqrt(12) RMS. A row of 32
# N(0, s) values spans about 4.1 s, so the error is about 0.46% of s (int8) and 7.9% (int4): bounds 1% and 10%.
@pytest.mark.parametrize("bits, bound", [("int8", 0.01), ("int4", 0.10)])
def test_lookup_close_to_float_table(bits, bound):
    torch.manual_seed(0)
    embedding = nn.Embedding(1000, HIDDEN, padding_idx=0)
    nn.init.normal_(embedding.weight, std=0.02)
    with torch.no_grad():
        embedding.weight[0] = 0
    quantized = PinFMQuantizedEmbedding.from_float(embedding, bits)
    table = embedding.weight.detach()
    error = relative_error(quantized.dequantize(), table)
    assert bound / 10 < error < bound  # quantised (not a copy), and as close as the rounding allows
    ids = torch.randint(0, 1000, (3, 4, 5))
    rows = quantized(ids)
    assert rows.shape == (3, 4, 5, HIDDEN) and rows.dtype == torch.float32
    assert torch.equal(rows, quantized.dequantize()[ids])  # the lookup op and the unpack op agree exactly
    assert relative_error(rows, table[ids]) < bound
    assert quantized(torch.zeros(2, dtype=torch.long)).abs().max() == 0  # the padding row stays exactly zero
    assert quantized(torch.zeros(0, 3, dtype=torch.long)).shape == (0, 3, HIDDEN)


def test_packed_bytes():
    embedding = nn.Embedding(1000, HIDDEN)
    fp32 = embedding.weight.nbytes
    int8 = PinFMQuantizedEmbedding.from_float(embedding, "int8")
    int4 = PinFMQuantizedEmbedding.from_float(embedding, "int4")
    # int8: the values + fp32 scale and bias; int4: two values a byte + fp16 scale and bias.
    assert int8.nbytes == 1000 * (HIDDEN + 8) == 1000 * packed_row_bytes(HIDDEN, "int8")
    assert int4.nbytes == 1000 * (HIDDEN // 2 + 4) == 1000 * packed_row_bytes(HIDDEN, "int4")
    assert int8.packed.dtype == int4.packed.dtype == torch.uint8
    assert int8.nbytes / fp32 == pytest.approx(40 / 128) and int4.nbytes / fp32 == pytest.approx(20 / 128)
    assert quantized_table_bytes(nn.ModuleList([int8, int4])) == int8.nbytes + int4.nbytes
    assert list(int8.parameters()) == []
    assert PinFMQuantizedEmbedding(7, HIDDEN, "int4").packed.shape == (7, HIDDEN // 2 + 4)  # empty, to be loaded


def test_bad_arguments():
    with pytest.raises(ValueError, match="item_embedding_quantization"):
        make_config(item_embedding_quantization="int2")
    with pytest.raises(ValueError, match="even"):
        make_config(hidden_size=36, num_attention_heads=2, num_item_hash_tables=4, item_embedding_quantization="int4")
    make_config(hidden_size=36, num_attention_heads=2, num_item_hash_tables=4, item_embedding_quantization="int8")
    with pytest.raises(ValueError, match="bits"):
        PinFMForPretraining(make_config()).quantize_item_embeddings("fp8")


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantize_save_load_identical(tmp_path, bits):
    torch.manual_seed(0)
    model = PinFMForPretraining(make_config()).eval()
    inputs = make_inputs()
    with torch.no_grad():
        expected = model(**inputs).query_embeddings
    assert model.quantize_item_embeddings(bits) is model
    assert not model.training and model.config.item_embedding_quantization == bits
    assert isinstance(model.pinfm.embeddings.item_embeddings.table, PinFMQuantizedEmbedding)
    with torch.no_grad():
        out = model(**inputs)
        scores = model.score_items(out.query_embeddings[:, -1])
    assert relative_error(out.query_embeddings, expected) < (0.02 if bits == "int8" else 0.2)
    assert scores.shape == (5, VOCAB) and torch.isinf(scores[:, :4]).all()

    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["item_embedding_quantization"] == bits
    assert (tmp_path / "quantization_pinfm.py").exists()
    loaded = PinFMForPretraining.from_pretrained(tmp_path)
    encoder = PinFMModel.from_pretrained(tmp_path)
    auto_encoder = AutoModel.from_pretrained(tmp_path)
    assert loaded.config.item_embedding_quantization == bits
    assert torch.equal(loaded.pinfm.embeddings.item_embeddings.table.packed, model.pinfm.embeddings.item_embeddings.table.packed)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).query_embeddings, out.query_embeddings)
        torch.testing.assert_close(loaded.score_items(out.query_embeddings[:, -1]), scores)
        hidden = model.pinfm(**inputs).last_hidden_state
        torch.testing.assert_close(encoder(**inputs).last_hidden_state, hidden)
        torch.testing.assert_close(auto_encoder(**inputs).last_hidden_state, hidden)


def test_training_refused_and_quantize_once():
    model = PinFMForPretraining(make_config()).quantize_item_embeddings("int8")
    assert list(model.pinfm.embeddings.item_embeddings.parameters()) == []
    with pytest.raises(RuntimeError, match="load the unquantised checkpoint to fine-tune"):
        model.train()
    model.eval()  # still usable for serving after the refusal
    assert not model.pinfm.embeddings.item_embeddings.table.training
    with pytest.raises(ValueError, match="already quantised"):
        model.quantize_item_embeddings("int4")
    with pytest.raises(RuntimeError, match="cannot be trained"):
        PinFMQuantizedEmbedding(4, 8).train()


def test_hashed_tables(tmp_path):
    torch.manual_seed(0)
    model = PinFMForPretraining(make_config(num_item_hash_tables=2, item_hash_table_size=101)).eval()
    inputs = make_inputs()
    item_ids = torch.arange(VOCAB)
    with torch.no_grad():
        expected = model.pinfm.embeddings.item_embeddings(item_ids)
    float_bytes = sum(p.nbytes for p in model.pinfm.embeddings.item_embeddings.parameters())
    model.quantize_item_embeddings("int4")
    tables = model.pinfm.embeddings.item_embeddings.tables
    assert len(tables) == 2 and all(isinstance(t, PinFMQuantizedEmbedding) for t in tables)
    assert quantized_table_bytes(model) == 2 * 101 * (HIDDEN // 4 + 4)
    assert quantized_table_bytes(model) < float_bytes / 4
    with torch.no_grad():
        assert relative_error(model.pinfm.embeddings.item_embeddings(item_ids), expected) < 0.10
        out = model(**inputs).query_embeddings
    model.save_pretrained(tmp_path)
    loaded = PinFMForPretraining.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).query_embeddings, out)


@pytest.mark.parametrize("fusion", ["early", "late"])
def test_ctr_model(tmp_path, fusion):
    torch.manual_seed(0)
    model = PinFMForCTR(make_config(ctr_fusion=fusion, ctr_dropout=0.0)).eval()
    batch = make_inputs()
    batch["action_ids"][:, -1] = model.config.candidate_action_id
    with torch.no_grad():
        expected = model(**batch).logits
        model.quantize_item_embeddings("int8")
        logits = model(**batch).logits
    torch.testing.assert_close(logits, expected, rtol=0.02, atol=0.02)
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(PinFMForCTR.from_pretrained(tmp_path)(**batch).logits, logits)


def test_trust_remote_code_load_without_package(tmp_path):
    torch.manual_seed(0)
    tokenizer = toy_tokenizer()
    config = make_config(item_vocab_size=len(tokenizer), action_vocab_size=tokenizer.action_vocab_size)
    model = PinFMForPretraining(config).quantize_item_embeddings("int4")
    report, expected, child = load_in_child_without_package(tmp_path, model, tokenizer)
    assert (tmp_path / "quantization_pinfm.py").is_file()  # copied next to modeling_pinfm.py
    assert report["head_class"] == "PinFMForPretraining" and not report["pinfm_hf_imported"]
    torch.testing.assert_close(child["last_hidden_state"], expected.last_hidden_state)
    torch.testing.assert_close(child["query_embeddings"], expected.query_embeddings)


def test_refused_train_leaves_every_module_as_it_was():
    model = PinFMForPretraining(make_config()).quantize_item_embeddings("int8")
    model.pinfm.layers[0].dropout.train()  # a mixed tree: the refusal must keep it exactly, not just eval() it
    before = {name: module.training for name, module in model.named_modules()}
    with pytest.raises(RuntimeError, match="cannot be trained"):
        model.train()
    assert {name: module.training for name, module in model.named_modules()} == before
    assert model.train(False) is model and not model.training  # eval mode is still allowed


def test_quantizing_one_model_leaves_a_shared_config_alone(tmp_path):
    torch.manual_seed(0)
    config = make_config()
    float_model, quantized = PinFMForPretraining(config).eval(), PinFMForPretraining(config)
    quantized.quantize_item_embeddings("int8")
    assert quantized.config.item_embedding_quantization == "int8"
    assert quantized.pinfm.config is quantized.config and quantized.pinfm.embeddings.config is quantized.config
    assert config.item_embedding_quantization is None and float_model.pinfm.config.item_embedding_quantization is None
    # The float model still saves as float: a folder claiming int8 would load all-zero packed tables.
    float_model.save_pretrained(tmp_path)
    inputs = make_inputs()
    with torch.no_grad():
        torch.testing.assert_close(PinFMForPretraining.from_pretrained(tmp_path)(**inputs).query_embeddings,
                                   float_model(**inputs).query_embeddings)
