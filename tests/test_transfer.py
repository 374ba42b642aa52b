"""Transfer strategies (what is loaded, frozen and at which learning rate) and per-use-case LoRA adapters."""

import pytest
import torch

from pinfm_hf import PinFMConfig, PinFMForCTR, PinFMForPretraining
from pinfm_hf.transfer import (
    CTR_CONFIG_NAME,
    TRANSFER_STRATEGIES,
    build_ctr_model,
    count_parameters,
    ctr_config_from_base,
    embedding_parameter_names,
    load_ctr_adapters,
    optimizer_param_groups,
    save_ctr_adapter,
)

from test_modeling_pinfm_ctr import make_batch


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    torch.manual_seed(0)
    config = PinFMConfig(item_vocab_size=60, action_vocab_size=6, hidden_size=16, num_attention_heads=2,
                         hidden_dropout_prob=0.0)
    model = PinFMForPretraining(config)
    path = tmp_path_factory.mktemp("base")
    model.save_pretrained(path)
    return path, model.state_dict()


def ctr_config(base_path, **overrides):
    return ctr_config_from_base(
        base_path, ctr_feature_vocab_size=12, ctr_feature_slots=[3, 1], ctr_feature_embedding_size=4, ctr_dropout=0.0,
        **overrides,
    )


def built(base, strategy, **kwargs):
    path, _ = base
    torch.manual_seed(1)
    return build_ctr_model(path, strategy, ctr_config(path), **kwargs)


def plain(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@pytest.mark.parametrize("strategy", sorted(TRANSFER_STRATEGIES))
def test_what_each_strategy_loads_freezes_and_trains(base, strategy):
    _, pretrained = base
    result = built(base, strategy)
    model = plain(result.model)
    state = model.state_dict()
    embeddings = embedding_parameter_names(model)
    # LoRA wraps the projections: their pretrained weights live under `base_layer`.
    dense = {n for n, p in model.named_parameters() if n.startswith("pinfm.layers.") and p.ndim == 2 and "lora_" not in n}
    assert embeddings and dense

    def loaded(names):
        return all(torch.equal(state[n], pretrained[n]) for n in names)

    if strategy == "none":
        assert not loaded(embeddings) and not loaded(dense)
    elif strategy in ("sparse", "sparse_freeze"):
        assert loaded(embeddings) and not any(torch.equal(state[n], pretrained[n]) for n in dense)
    else:
        assert loaded(embeddings)
        for name in dense:
            assert torch.equal(state[name], pretrained[name.replace(".base_layer", "")]), name

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen_embeddings = strategy in ("sparse_freeze", "full_sparse_freeze", "frozen_backbone", "lora")
    assert trainable.isdisjoint(embeddings) == frozen_embeddings
    head = {n for n in trainable if n.startswith(("ctr_head", "ctr_feature_embeddings"))}
    assert head  # the head always trains
    if strategy == "frozen_backbone":
        assert trainable == head
    if strategy == "lora":
        assert all("lora_" in n or ".modules_to_save." in n for n in trainable)
    # Trainable pretrained weights, and only those, get the backbone learning rate.
    groups = optimizer_param_groups(result, learning_rate=1e-3, backbone_learning_rate=1e-5)
    slow = {id(p) for g in groups if g["lr"] == 1e-5 for p in g["params"]}
    named = dict(result.model.named_parameters())
    expect_slow = {id(named[n]) for n in named if named[n].requires_grad and n.removeprefix("base_model.model.") in result.transferred}
    assert slow == expect_slow
    assert bool(slow) == (strategy in ("full", "sparse", "full_sparse_freeze"))
    # Without the auxiliary loss the ranker holds no next-item head, so no parameter goes without a gradient (DDP
    # needs every trainable parameter used).
    assert not any("next_item_head" in n for n in trainable)
    assert sum(p.numel() for g in groups for p in g["params"]) == count_parameters(result.model)[0]


def test_frozen_embeddings_do_not_move_in_training(base):
    result = built(base, "sparse_freeze")
    model = result.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(optimizer_param_groups(result, learning_rate=1e-2, backbone_learning_rate=1e-3))
    for _ in range(3):
        model(**make_batch(), labels=torch.tensor([1.0, 0.0, 1.0, 0.0])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    embeddings = embedding_parameter_names(model)
    assert embeddings and not any(p.requires_grad for n, p in model.named_parameters() if n in embeddings)
    for name, param in model.named_parameters():
        assert (not torch.equal(param, before[name])) == param.requires_grad, name  # trains iff trainable


def train_adapter(base, steps: int, seed: int):
    path, _ = base
    torch.manual_seed(1)
    result = build_ctr_model(path, "lora", ctr_config(path, ctr_item_bias=True), lora_rank=2, lora_alpha=4)
    model = result.model
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(optimizer_param_groups(result, learning_rate=5e-2, backbone_learning_rate=0.0))
    labels = torch.randint(0, 2, (4,), generator=torch.Generator().manual_seed(seed)).float()
    for _ in range(steps):
        model(**make_batch(seed=seed), labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def test_two_adapters_share_one_base_and_reproduce_their_scores(base, tmp_path):
    path, _ = base
    like, love = train_adapter(base, steps=5, seed=1), train_adapter(base, steps=5, seed=2)
    batch = make_batch(seed=3)
    with torch.no_grad():
        expected = {"like": like(**batch).logits, "love": love(**batch).logits}
    assert not torch.allclose(expected["like"], expected["love"])
    for adapter in (like, love):  # the per-item bias trains with the head and travels with the adapter
        assert torch.count_nonzero(adapter.get_base_model().ctr_item_bias.weight) > 0
    save_ctr_adapter(like, tmp_path / "like")
    save_ctr_adapter(love, tmp_path / "love")
    assert (tmp_path / "like" / CTR_CONFIG_NAME).is_file()

    model = load_ctr_adapters(path, {"like": tmp_path / "like", "love": tmp_path / "love"})
    base_model = model.get_base_model()
    with torch.no_grad():
        for name in ("like", "love", "like"):
            model.set_adapter(name)
            assert model.get_base_model() is base_model  # switched, not reloaded
            torch.testing.assert_close(model(**batch).logits, expected[name])
        model.set_adapter("love")
        merged = model.merge_and_unload()
        assert isinstance(merged, PinFMForCTR)
        torch.testing.assert_close(merged(**batch).logits, expected["love"], atol=1e-5, rtol=1e-5)


def test_adapters_with_different_heads_are_refused(base, tmp_path):
    path, _ = base
    save_ctr_adapter(train_adapter(base, steps=1, seed=1), tmp_path / "a")
    torch.manual_seed(0)
    other = build_ctr_model(path, "lora", ctr_config(path, ctr_head="dcn")).model
    save_ctr_adapter(other, tmp_path / "b")
    with pytest.raises(ValueError, match="needs a different head"):
        load_ctr_adapters(path, {"a": tmp_path / "a", "b": tmp_path / "b"})
    with pytest.raises(FileNotFoundError, match=CTR_CONFIG_NAME):
        load_ctr_adapters(path, {"a": tmp_path})


def test_unknown_strategy_and_field(base):
    path, _ = base
    with pytest.raises(ValueError, match="Unknown transfer strategy 'partial'"):
        build_ctr_model(path, "partial", ctr_config(path))
    with pytest.raises(ValueError, match="Unknown PinFMConfig field"):
        ctr_config_from_base(path, ctr_heads="mlp")


def train_three_steps(result):
    optimizer = torch.optim.AdamW(optimizer_param_groups(result, learning_rate=5e-2, backbone_learning_rate=0.0))
    for _ in range(3):
        result.model(**make_batch(), labels=torch.tensor([1.0, 0.0, 1.0, 0.0])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def assert_adapter_round_trips(model, base_path, tmp_path):
    """The adapter saved and loaded back onto the base gives the trained model's scores."""
    model.eval()
    batch = make_batch(seed=3)
    with torch.no_grad():
        expected = model(**batch).logits
    save_ctr_adapter(model, tmp_path / "like")
    with torch.no_grad():
        reloaded = load_ctr_adapters(base_path, {"like": tmp_path / "like"})(**batch).logits
    torch.testing.assert_close(reloaded, expected)


def test_lora_on_the_item_table_trains_a_low_rank_update_and_round_trips(base, tmp_path):
    path, _ = base
    result = build_ctr_model(path, "lora", ctr_config(path), lora_rank=2, lora_alpha=4, lora_item_embeddings_rank=1)
    model = result.model
    table = model.get_base_model().pinfm.embeddings.item_embeddings.table
    assert table.lora_embedding_A["default"].shape == (1, table.base_layer.num_embeddings)  # rank 1 there, rank 2 elsewhere
    assert model.get_base_model().pinfm.layers[0].self_attn.q_proj.lora_A["default"].weight.shape[0] == 2
    assert not table.base_layer.weight.requires_grad  # the pretrained rows stay frozen; only the update trains
    frozen_rows = table.base_layer.weight.detach().clone()
    train_three_steps(result)
    assert torch.equal(table.base_layer.weight, frozen_rows)
    assert torch.count_nonzero(table.lora_embedding_B["default"]) > 0  # B starts at zero: it moved
    assert_adapter_round_trips(result.model, path, tmp_path)


def test_lora_on_a_hashed_item_table_is_refused(tmp_path):
    config = PinFMConfig(item_vocab_size=60, action_vocab_size=6, hidden_size=16, num_attention_heads=2,
                         num_item_hash_tables=2, item_hash_table_size=32)
    PinFMForPretraining(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="lora_item_embeddings_rank"):
        build_ctr_model(tmp_path, "lora", ctr_config(tmp_path), lora_rank=2, lora_item_embeddings_rank=1)


def test_the_item_field_table_travels_with_its_lora_adapter(base, tmp_path):
    # Each use case fits its own side-feature vocabulary: its item -> genre table must come back with its adapter.
    from test_modeling_pinfm_ctr import genre_table

    path, _ = base
    config = ctr_config(path, ctr_history_field_match_features=True, ctr_item_feature_fields=[0])
    table = genre_table(seed=1)
    torch.manual_seed(1)
    result = build_ctr_model(path, "lora", config, lora_rank=2, lora_alpha=4, item_features=(torch.arange(60), table))
    model = result.model.eval()
    assert torch.equal(model.get_base_model().ctr_item_features.modules_to_save["default"].item_feature_ids, table.int())
    batch = make_batch(seed=3)
    batch["side_feature_ids"][:, :3] = table[batch["input_ids"][:, -1]]
    with torch.no_grad():
        expected = model(**batch).logits
    save_ctr_adapter(model, tmp_path / "like")
    reloaded = load_ctr_adapters(path, {"like": tmp_path / "like"})
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, expected)
        torch.manual_seed(1)
        blank = build_ctr_model(path, "lora", config, lora_rank=2, lora_alpha=4).model.eval()
        assert not torch.allclose(blank(**batch).logits, expected)  # the same adapter without the table scores otherwise


def test_dora_learns_the_norms_of_the_adapted_weights_and_round_trips(base, tmp_path):
    path, _ = base
    result = build_ctr_model(path, "lora", ctr_config(path), lora_rank=2, lora_alpha=4, lora_use_dora=True)
    model = result.model
    q_proj = model.get_base_model().pinfm.layers[0].self_attn.q_proj
    magnitude = q_proj.lora_magnitude_vector["default"].weight
    assert magnitude.requires_grad and magnitude.shape == (q_proj.base_layer.out_features,)
    trainable, _ = count_parameters(model)
    plain_lora, _ = count_parameters(build_ctr_model(path, "lora", ctr_config(path), lora_rank=2, lora_alpha=4).model)
    assert trainable > plain_lora  # the magnitudes are counted in the use case's share
    initial = magnitude.detach().clone()
    train_three_steps(result)
    assert not torch.equal(magnitude, initial)
    assert_adapter_round_trips(result.model, path, tmp_path)
