import dataclasses
import math
import tempfile
import unittest

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForPreTraining

from pinfm_hf import PinFMConfig, PinFMForPretraining, PinFMModel, PretrainingObjective
from pinfm_hf.losses import offset_pairs


OBJECTIVE_FIELDS = {f.name for f in dataclasses.fields(PretrainingObjective)}


class PinFMModelTester:
    def __init__(self, batch_size=13, seq_length=7, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 item_vocab_size=50, action_vocab_size=6, **config_overrides):
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.item_vocab_size = item_vocab_size
        self.action_vocab_size = action_vocab_size
        # Training fields go to the objective, architecture fields to the config.
        self.objective = PretrainingObjective(**{k: v for k, v in config_overrides.items() if k in OBJECTIVE_FIELDS})
        self.config_overrides = {k: v for k, v in config_overrides.items() if k not in OBJECTIVE_FIELDS}

    def get_config(self) -> PinFMConfig:
        return PinFMConfig(
            item_vocab_size=self.item_vocab_size,
            action_vocab_size=self.action_vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=37,
            **self.config_overrides,
        )

    def pretraining_model(self, config: PinFMConfig = None) -> PinFMForPretraining:
        model = PinFMForPretraining(config or self.get_config())
        model.objective = dataclasses.replace(self.objective)
        return model

    def prepare_inputs(self, seed: int = 0) -> dict:
        g = torch.Generator().manual_seed(seed)
        B, T = self.batch_size, self.seq_length
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        lengths[0] = T
        mask = (torch.arange(T)[None] < lengths[:, None]).long()  # right padding
        input_ids = torch.randint(4, self.item_vocab_size, (B, T), generator=g) * mask
        action_ids = torch.randint(2, self.action_vocab_size, (B, T), generator=g) * mask
        gaps = torch.randint(0, 100_000, (B, T), generator=g)
        timestamps = (1_000_000_000 + gaps.cumsum(dim=1)) * mask
        return {"input_ids": input_ids, "action_ids": action_ids, "timestamps": timestamps, "attention_mask": mask}

    def prepare_config_and_inputs(self):
        return self.get_config(), self.prepare_inputs()

    def create_and_check_model(self, config, inputs):
        model = PinFMModel(config).eval()
        out = model(**inputs)
        assert out.last_hidden_state.shape == (self.batch_size, self.seq_length, self.hidden_size)
        assert out.user_embedding.shape == (self.batch_size, self.hidden_size)
        last = inputs["attention_mask"].sum(1) - 1
        torch.testing.assert_close(out.user_embedding, out.last_hidden_state[torch.arange(self.batch_size), last])

    def create_and_check_pretraining(self, config, inputs):
        model = PinFMForPretraining(config).eval()
        labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
        out = model(**inputs, labels=labels)
        assert out.loss.shape == ()
        assert out.query_embeddings.shape == (self.batch_size, self.seq_length, config.projection_size)
        scores = model.score_items(out.query_embeddings[:, -1])
        assert scores.shape == (self.batch_size, self.item_vocab_size)
        assert torch.isinf(scores[:, : config.num_special_item_tokens]).all()


def to_left_padding(inputs: dict) -> dict:
    """Move each row's padding from the right to the left."""
    mask = inputs["attention_mask"]
    T = mask.shape[1]
    shift = T - mask.sum(1)
    index = (torch.arange(T)[None] - shift[:, None]) % T  # (B, T)
    return {k: v.gather(1, index) for k, v in inputs.items()}


class PinFMModelTest(unittest.TestCase):
    def setUp(self):
        torch.manual_seed(0)
        self.tester = PinFMModelTester()

    def test_model(self):
        self.tester.create_and_check_model(*self.tester.prepare_config_and_inputs())

    def test_pretraining_head(self):
        self.tester.create_and_check_pretraining(*self.tester.prepare_config_and_inputs())

    def test_causality(self):
        config, inputs = self.tester.prepare_config_and_inputs()
        model = PinFMModel(config).eval()
        before = model(**inputs).last_hidden_state
        changed = {k: v.clone() for k, v in inputs.items()}
        j = 4
        changed["input_ids"][0, j] = 5 if changed["input_ids"][0, j] != 5 else 6
        changed["action_ids"][0, j] = 2 if changed["action_ids"][0, j] != 2 else 3
        after = model(**changed).last_hidden_state
        torch.testing.assert_close(before[0, :j], after[0, :j])
        assert not torch.allclose(before[0, j:], after[0, j:])

    def test_left_and_right_padding_agree(self):
        config, inputs = self.tester.prepare_config_and_inputs()
        model = PinFMModel(config).eval()
        right = model(**inputs)
        left_inputs = to_left_padding(inputs)
        left = model(**left_inputs)
        mask = inputs["attention_mask"].bool()
        torch.testing.assert_close(right.last_hidden_state[mask], left.last_hidden_state[left_inputs["attention_mask"].bool()])
        torch.testing.assert_close(right.user_embedding, left.user_embedding)

    def test_time_features_are_used_and_can_be_disabled(self):
        config, inputs = self.tester.prepare_config_and_inputs()
        later = dict(inputs, timestamps=inputs["timestamps"] * 2)
        with_time = PinFMModel(config).eval()
        assert not torch.allclose(with_time(**inputs).last_hidden_state, with_time(**later).last_hidden_state)
        without_time = PinFMModel(PinFMConfig(**{**config.to_dict(), "use_time_features": False})).eval()
        torch.testing.assert_close(without_time(**inputs).last_hidden_state, without_time(**later).last_hidden_state)
        with pytest.raises(ValueError, match="timestamps"):
            with_time(input_ids=inputs["input_ids"], action_ids=inputs["action_ids"])

    def test_absolute_position_embeddings_add_the_event_index(self):
        config, inputs = self.tester.prepare_config_and_inputs()
        rope_only = PinFMModel(config).eval()
        with_positions = PinFMModel(PinFMConfig(**{**config.to_dict(), "use_absolute_position_embeddings": True})).eval()
        with_positions.load_state_dict(rope_only.state_dict(), strict=False)
        expected = rope_only(**inputs).last_hidden_state
        assert not torch.allclose(with_positions(**inputs).last_hidden_state, expected)
        with torch.no_grad():
            with_positions.position_embeddings.weight.zero_()  # nothing else differs
        torch.testing.assert_close(with_positions(**inputs).last_hidden_state, expected)
        # Positions count real events, so left padding still agrees with right padding.
        with torch.no_grad():
            with_positions.position_embeddings.weight.normal_()
        right, left_inputs = with_positions(**inputs), to_left_padding(inputs)
        left = with_positions(**left_inputs)
        torch.testing.assert_close(
            right.last_hidden_state[inputs["attention_mask"].bool()], left.last_hidden_state[left_inputs["attention_mask"].bool()]
        )
        # Positions past the table share its last row (the collator truncates to `max_length` before that).
        table = with_positions.position_embeddings.weight
        hidden = torch.zeros(1, 6, table.shape[1])
        with_positions.config.max_position_embeddings = 4
        added = with_positions.add_position_embeddings(hidden, torch.arange(6)[None])
        torch.testing.assert_close(added[0], table[[0, 1, 2, 3, 3, 3]])

    def test_time_features_are_causal(self):
        # Position i may see the time of event i + 1 (its request time), never a later one.
        config, inputs = self.tester.prepare_config_and_inputs()
        model = PinFMModel(config).eval()
        i = 2
        later = inputs["timestamps"].clone()
        later[:, i + 2 :] += 10_000_000 * inputs["attention_mask"][:, i + 2 :]
        before = model(**inputs).last_hidden_state
        after = model(**dict(inputs, timestamps=later)).last_hidden_state
        torch.testing.assert_close(before[:, : i + 1], after[:, : i + 1])
        assert not torch.allclose(before[0, i + 2 :], after[0, i + 2 :])
        sooner_request = inputs["timestamps"].clone()
        sooner_request[:, i + 1] = sooner_request[:, i]  # the request time of position i moves, so position i changes
        assert not torch.allclose(before[0, i], model(**dict(inputs, timestamps=sooner_request)).last_hidden_state[0, i])

    def test_request_time_moves_only_the_last_event(self):
        config, inputs = self.tester.prepare_config_and_inputs()
        model = PinFMModel(config).eval()
        last = inputs["attention_mask"].sum(1) - 1
        request = inputs["timestamps"].gather(1, last[:, None]).squeeze(1) + 86_400
        before = model(**inputs).last_hidden_state
        after = model(**inputs, end_timestamps=request).last_hidden_state
        rows = torch.arange(len(last))
        torch.testing.assert_close(before[0, :-1], after[0, :-1])
        assert not torch.allclose(before[rows, last], after[rows, last])

    def test_actions_are_used(self):
        config, inputs = self.tester.prepare_config_and_inputs()
        model = PinFMModel(config).eval()
        other = dict(inputs, action_ids=(inputs["action_ids"] % 3 + 2) * inputs["attention_mask"])
        assert not torch.allclose(model(**inputs).last_hidden_state, model(**other).last_hidden_state)

    def test_eager_attention_matches_sdpa(self):
        config, inputs = self.tester.prepare_config_and_inputs()
        model = PinFMModel(config).eval()
        sdpa = model(**inputs)
        eager = model(**inputs, output_attentions=True, output_hidden_states=True)
        torch.testing.assert_close(sdpa.last_hidden_state, eager.last_hidden_state, rtol=1e-5, atol=1e-5)
        assert len(eager.attentions) == config.num_hidden_layers
        assert len(eager.hidden_states) == config.num_hidden_layers + 1
        probs = eager.attentions[0]
        assert torch.all(probs.triu(diagonal=1) == 0)  # causal

    def test_hashed_item_tables(self):
        tester = PinFMModelTester(item_vocab_size=10**9, num_item_hash_tables=4, item_hash_table_size=1009)
        config, inputs = tester.prepare_config_and_inputs()
        model = PinFMModel(config).eval()
        n_item_params = sum(p.numel() for p in model.embeddings.item_embeddings.parameters())
        assert n_item_params == 1009 * tester.hidden_size  # 4 tables x 1009 rows x hidden/4
        out = model(**dict(inputs, input_ids=inputs["input_ids"] * 10**7 % 10**9))
        assert out.last_hidden_state.shape == (tester.batch_size, tester.seq_length, tester.hidden_size)
        ids = torch.arange(4, 2004)
        vectors = model.embeddings.item_embeddings(ids)
        assert torch.unique(vectors, dim=0).shape[0] == ids.numel()  # concatenated hashes tell items apart
        with pytest.raises(ValueError, match="divisible by `num_item_hash_tables`"):
            PinFMConfig(hidden_size=32, num_attention_heads=2, num_item_hash_tables=3)

    def test_gradient_checkpointing_matches(self):
        config, inputs = self.tester.prepare_config_and_inputs()
        config.hidden_dropout_prob = 0.0
        model = PinFMForPretraining(config).train()
        labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
        torch.manual_seed(1)
        model(**inputs, labels=labels).loss.backward()
        reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        model.activation_checkpointing_enable()
        torch.manual_seed(1)
        model(**inputs, labels=labels).loss.backward()
        for name, grad in reference.items():
            torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-6)

    def test_save_load_round_trip(self):
        config, inputs = self.tester.prepare_config_and_inputs()
        model = PinFMForPretraining(config).eval()
        model.set_item_counts(torch.arange(config.item_vocab_size))
        with torch.no_grad():
            model.next_item_head.log_temperature.fill_(-2.5)
        expected = model(**inputs)
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            reloaded = AutoModelForPreTraining.from_pretrained(tmp)
            assert isinstance(reloaded, PinFMForPretraining)
            got = reloaded(**inputs)
            torch.testing.assert_close(got.query_embeddings, expected.query_embeddings)
            torch.testing.assert_close(reloaded.next_item_head.item_log_probs, model.next_item_head.item_log_probs)
            torch.testing.assert_close(reloaded.temperature, model.temperature)
            # The encoder alone loads from the pretraining checkpoint through AutoModel.
            encoder = AutoModel.from_pretrained(tmp)
            assert isinstance(encoder, PinFMModel)
            torch.testing.assert_close(encoder(**inputs).last_hidden_state, expected.last_hidden_state)
            assert AutoConfig.from_pretrained(tmp).hidden_size == config.hidden_size

    def test_config_validation(self):
        with pytest.raises(ValueError, match="divisible by `num_attention_heads`"):
            PinFMConfig(hidden_size=30, num_attention_heads=4)
        with pytest.raises(ValueError, match="negative_sampling"):
            PretrainingObjective(negative_sampling="zipf")
        with pytest.raises(ValueError, match="multi_token_loss_weight"):
            PretrainingObjective(multi_token_loss_weight=-1)
        with pytest.raises(ValueError, match="contrastive_item_mask_prob"):
            PretrainingObjective(contrastive_item_mask_prob=1.0)
        with pytest.raises(ValueError, match="same_time_shuffle_prob"):
            PretrainingObjective(same_time_shuffle_prob=1.5)


def test_lora_wrap_merge_gives_equal_outputs():
    from peft import LoraConfig, get_peft_model

    from pinfm_hf.modeling_pinfm import PINFM_LORA_TARGET_MODULES

    tester = PinFMModelTester()
    config, inputs = tester.prepare_config_and_inputs()
    model = PinFMModel(config).eval()
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=PINFM_LORA_TARGET_MODULES, init_lora_weights=False))
    peft_model.eval()
    with torch.no_grad():
        adapted = peft_model(**inputs).last_hidden_state
    merged = peft_model.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).last_hidden_state, adapted, rtol=1e-4, atol=1e-5)


def pretraining_batch(tester: PinFMModelTester):
    inputs = tester.prepare_inputs()
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    return inputs, labels


def train_and_track(model, inputs, labels, loss_name: str, steps: int = 15) -> list[float]:
    """Train on one batch with Adam; the value of output `<loss_name>_loss` (never None) at each step."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        out = model(**inputs, labels=labels)
        assert getattr(out, f"{loss_name}_loss") is not None
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(getattr(out, f"{loss_name}_loss").item())
    return losses


@pytest.mark.parametrize("loss_name", ["next_token", "multi_token", "future_token"])
def test_each_loss_decreases(loss_name):
    torch.manual_seed(0)
    weights = {f"{name}_loss_weight": float(name == loss_name) for name in ("next_token", "multi_token", "future_token")}
    tester = PinFMModelTester(
        seq_length=12, multi_token_window=3, future_token_input_length=4, num_negatives=16, hidden_dropout_prob=0.0,
        **weights,
    )
    model = tester.pretraining_model().train()
    inputs, labels = pretraining_batch(tester)
    out = model(**inputs, labels=labels)
    assert all(getattr(out, f"{other}_loss") is None for other in ("next_token", "multi_token", "future_token") if other != loss_name)
    losses = train_and_track(model, inputs, labels, loss_name)
    assert losses[-1] < 0.8 * losses[0], losses


def test_contrastive_loss_compares_two_dropout_passes_in_training_only():
    tester = PinFMModelTester(seq_length=12, hidden_dropout_prob=0.3, contrastive_loss_weight=0.5, contrastive_max_queries=20)
    model = tester.pretraining_model().train()
    inputs, labels = pretraining_batch(tester)
    torch.manual_seed(0)
    out = model(**inputs, labels=labels)
    assert out.contrastive_loss is not None and out.contrastive_loss.item() > 0
    torch.testing.assert_close(out.loss, out.next_token_loss + 0.5 * out.contrastive_loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # Without dropout the two passes are the same queries: nothing to tell them apart but the other queries.
    model.eval()
    assert model(**inputs, labels=labels).contrastive_loss is None  # not an evaluation loss
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    without_dropout = model(**inputs, labels=labels).contrastive_loss
    assert without_dropout < out.contrastive_loss


def test_item_mask_augmentation_masks_only_real_items_at_the_given_rate():
    from pinfm_hf.modeling_pinfm import MASK_ITEM_ID, mask_random_items
    from pinfm_hf.tokenization_pinfm import MASK_ID

    assert MASK_ITEM_ID == MASK_ID
    torch.manual_seed(0)
    input_ids = torch.randint(4, 100, (64, 50))
    input_ids[:, :10] = 0  # left padding
    input_ids[:, 10] = 3  # a special token (the candidate)
    attention_mask = (input_ids != 0).long()
    masked = mask_random_items(input_ids, attention_mask, 0.3, num_special_item_tokens=4)
    changed = masked != input_ids
    assert (masked[changed] == MASK_ITEM_ID).all()
    assert not changed[:, :11].any()
    assert abs(changed[:, 11:].float().mean().item() - 0.3) < 0.03
    assert mask_random_items(input_ids, attention_mask, 0.0, 4) is input_ids


def test_contrastive_loss_second_view_sees_masked_items():
    tester = PinFMModelTester(
        seq_length=12, hidden_dropout_prob=0.0, contrastive_loss_weight=1.0, contrastive_item_mask_prob=0.5,
    )
    model = tester.pretraining_model().train()
    inputs, labels = pretraining_batch(tester)
    # Without hidden dropout the views differ mostly by the masked items: masking must raise the loss.
    unmasked = PinFMModelTester(seq_length=12, hidden_dropout_prob=0.0, contrastive_loss_weight=1.0)
    model.objective = unmasked.objective
    same_views = model(**inputs, labels=labels).contrastive_loss
    model.objective = tester.objective
    torch.manual_seed(0)
    masked_views = model(**inputs, labels=labels).contrastive_loss
    assert masked_views > same_views + 0.01, (masked_views, same_views)


def day_granularity(inputs: dict) -> dict:
    """The batch with its timestamps cut to whole days, as review logs hold them: many events share one."""
    return dict(inputs, timestamps=inputs["timestamps"] // 86_400 * 86_400)


def test_same_time_shuffle_reorders_only_within_same_time_runs_of_one_sequence():
    from pinfm_hf.losses import packed_sequence_ids
    from pinfm_hf.modeling_pinfm import same_time_shuffle_index

    torch.manual_seed(0)
    B, T = 64, 24
    timestamps = torch.randint(0, 4, (B, T)).cumsum(dim=1) * 86_400  # ~1 in 4 events opens a new day
    timestamps[:, 10:12] = timestamps[:, 9:10]  # a run across the two packed sequences below
    attention_mask = torch.ones(B, T, dtype=torch.long)
    attention_mask[:, 20:] = 0  # padding after a run of the last sequence's time
    timestamps[:, 20:] = timestamps[:, 19:20]
    position_ids = torch.cat([torch.arange(11), torch.arange(13)]).expand(B, T)  # sequences of 11 and 13 events
    sequence = packed_sequence_ids(position_ids)
    assert same_time_shuffle_index(timestamps, attention_mask, position_ids, 0.0).equal(torch.arange(T).expand(B, T))
    for probability in (1.0, 0.5):
        index = same_time_shuffle_index(timestamps, attention_mask, position_ids, probability)
        assert index.sort(dim=1).values.equal(torch.arange(T).expand(B, T))  # a permutation of each row
        assert timestamps.gather(1, index).equal(timestamps)  # each event stays among events of its time
        assert sequence.gather(1, index).equal(sequence)  # ... of its own sequence
        assert index[:, 20:].equal(torch.arange(20, T).expand(B, T - 20))  # padding stays
        # Runs of two or more events that changed order: a drawn run of k keeps its order with chance 1 / k! only.
        runs = (timestamps * 100 + sequence).masked_fill(attention_mask == 0, -1)
        changed, expected = [], []
        for b in range(B):
            for r in runs[b].unique().tolist():
                at = torch.nonzero(runs[b] == r).squeeze(1)
                if r >= 0 and len(at) >= 2:
                    changed.append(float((index[b][at] != at).any()))
                    expected.append(probability * (1 - 1 / math.factorial(len(at))))
        assert abs(sum(changed) - sum(expected)) < 0.1 * len(changed), (probability, sum(changed), sum(expected))
    with pytest.raises(ValueError, match="timestamps"):
        same_time_shuffle_index(None, attention_mask, position_ids, 0.5)


def test_same_time_shuffle_trains_on_reordered_events_and_never_evaluates_on_them():
    from pinfm_hf.modeling_pinfm import same_time_shuffle_index

    tester = PinFMModelTester(
        seq_length=12, hidden_dropout_prob=0.0, attention_dropout=0.0, full_softmax="true", same_time_shuffle_prob=1.0
    )
    model = tester.pretraining_model().train()
    inputs, labels = pretraining_batch(tester)
    inputs = day_granularity(inputs)
    plain = tester.pretraining_model().train()
    plain.load_state_dict(model.state_dict())
    plain.objective = dataclasses.replace(tester.objective, same_time_shuffle_prob=0.0)
    torch.manual_seed(0)
    shuffled_loss = model(**inputs, labels=labels).loss
    torch.manual_seed(0)
    index = same_time_shuffle_index(inputs["timestamps"], inputs["attention_mask"], None, 1.0)
    assert not index.equal(torch.arange(12).expand_as(index))
    reordered = {key: value.gather(1, index) for key, value in inputs.items()}
    torch.testing.assert_close(shuffled_loss, plain(**reordered, labels=labels.gather(1, index)).loss)
    assert abs(shuffled_loss.item() - plain(**inputs, labels=labels).loss.item()) > 1e-4
    model.eval(), plain.eval()
    torch.testing.assert_close(model(**inputs, labels=labels).loss, plain(**inputs, labels=labels).loss)


def test_contrastive_second_view_sees_same_time_events_reordered():
    tester = PinFMModelTester(
        seq_length=12, hidden_dropout_prob=0.0, attention_dropout=0.0, full_softmax="true", contrastive_loss_weight=1.0,
        contrastive_same_time_shuffle_prob=1.0,
    )
    model = tester.pretraining_model().train()
    inputs, labels = pretraining_batch(tester)
    inputs = day_granularity(inputs)
    # Without dropout the two views are equal unless the second is reordered: reordering must raise the loss.
    model.objective = dataclasses.replace(tester.objective, contrastive_same_time_shuffle_prob=0.0)
    same_views = model(**inputs, labels=labels)
    model.objective = tester.objective
    torch.manual_seed(0)
    reordered_views = model(**inputs, labels=labels)
    assert reordered_views.contrastive_loss > same_views.contrastive_loss + 0.01
    torch.testing.assert_close(reordered_views.next_token_loss, same_views.next_token_loss)  # the first view as logged


def test_contrastive_loss_pulls_views_of_a_query_together():
    torch.manual_seed(0)
    tester = PinFMModelTester(
        seq_length=12, hidden_dropout_prob=0.3, next_token_loss_weight=0.0, contrastive_loss_weight=1.0,
    )
    model = tester.pretraining_model().train()
    inputs, labels = pretraining_batch(tester)
    losses = train_and_track(model, inputs, labels, "contrastive")
    assert losses[-1] < 0.8 * losses[0], losses


def test_losses_are_zero_safe_without_positive_targets():
    from pinfm_hf.data import PinFMDataCollator

    tester = PinFMModelTester(multi_token_loss_weight=1.0, future_token_loss_weight=1.0)
    model = tester.pretraining_model().train()
    inputs, _ = pretraining_batch(tester)
    inputs["action_ids"] = inputs["action_ids"].clamp(max=4)  # no event has the positive action 5
    collator = PinFMDataCollator(return_labels=True, positive_action_ids=[5])  # targets: events with action 5 only

    def labelled(batch):
        rows = [{k: v[i][batch["attention_mask"][i] == 1].tolist() for k, v in batch.items()} for i in range(len(batch["input_ids"]))]
        return collator(rows)

    out = model(**labelled(inputs))
    assert out.loss.item() == 0.0 and out.next_token_loss.item() == 0.0
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # With one positive event in range the loss is no longer zero.
    inputs["action_ids"][0, 3] = 5
    assert model(**labelled(inputs)).next_token_loss.item() > 0


def test_future_token_loss_queries_only_at_window_ends():
    tester = PinFMModelTester(seq_length=7, next_token_loss_weight=0.0, future_token_loss_weight=1.0, future_token_input_length=8)
    model = tester.pretraining_model()
    inputs, labels = pretraining_batch(tester)
    assert model(**inputs, labels=labels).future_token_loss.item() == 0.0  # no full length-8 window in 7 events
    valid = inputs["attention_mask"].bool()
    query, target = offset_pairs(valid & (torch.arange(7) == 3), torch.ones_like(valid), offsets=range(1, 3))
    assert sorted((query % 7).tolist()) == [3] * len(query) and set((target - query).tolist()) == {1, 2}


def test_log_q_correction_and_full_softmax():
    tester = PinFMModelTester(hidden_dropout_prob=0.0, num_negatives=32)
    config = tester.get_config()
    inputs, labels = pretraining_batch(tester)
    model = tester.pretraining_model(config).eval()
    model.set_item_counts(torch.arange(config.item_vocab_size) ** 2)
    torch.manual_seed(3)
    with_log_q = model(**inputs, labels=labels).loss
    model.objective.use_log_q_correction = False
    torch.manual_seed(3)
    without_log_q = model(**inputs, labels=labels).loss
    assert not torch.isclose(with_log_q, without_log_q)
    # Full softmax equals cross-entropy over every regular item, computed from the public scoring API.
    model.objective.full_softmax = True
    out = model(**inputs, labels=labels)
    scores = model.score_items(out.query_embeddings[:, :-1])  # (B, T-1, V)
    targets = labels[:, 1:]
    keep = (targets != -100) & (inputs["attention_mask"][:, :-1] == 1)
    expected = torch.nn.functional.cross_entropy(scores[keep], targets[keep])
    torch.testing.assert_close(out.loss, expected, rtol=1e-4, atol=1e-5)


def test_full_softmax_losses_match_cross_entropy_over_all_their_pairs():
    # The full softmax scores each query once and shares it across losses; each loss must still equal the
    # cross-entropy over every (query, target) pair it defines.
    tester = PinFMModelTester(seq_length=12, hidden_dropout_prob=0.0, full_softmax=True, multi_token_loss_weight=0.5,
                              future_token_loss_weight=0.25, multi_token_window=3, future_token_input_length=4)
    model = tester.pretraining_model().eval()
    inputs, labels = pretraining_batch(tester)
    out = model(**inputs, labels=labels)
    scores = model.score_items(out.query_embeddings).flatten(0, 1)  # (B*T, V)
    valid, positive = inputs["attention_mask"].bool(), labels != -100
    window_end = (torch.arange(12) + 1) % 4 == 0
    for name, queries, offsets in (("next_token", valid, range(1, 2)), ("multi_token", valid, range(1, 4)),
                                   ("future_token", valid & window_end, range(1, 4))):
        query_index, target_index = offset_pairs(queries, positive, offsets=offsets)
        expected = torch.nn.functional.cross_entropy(scores[query_index], labels.flatten()[target_index])
        torch.testing.assert_close(getattr(out, f"{name}_loss"), expected, rtol=1e-4, atol=1e-5)
    weighted = out.next_token_loss + 0.5 * out.multi_token_loss + 0.25 * out.future_token_loss
    torch.testing.assert_close(out.loss, weighted)
    # One loss alone takes the fused cross-entropy path: the same next-token loss.
    model.objective.multi_token_loss_weight = model.objective.future_token_loss_weight = 0.0
    alone = model(**inputs, labels=labels)
    assert alone.multi_token_loss is None and alone.future_token_loss is None
    torch.testing.assert_close(alone.loss, out.next_token_loss)


# ----- bad inputs: empty rows, misshapen batches, ids outside the vocabulary, unsorted time, corrupt weights -----


def with_row(inputs: dict, row: dict, at: int) -> dict:
    """`inputs` with one more row inserted at index `at`."""
    return {k: torch.cat([v[:at], row[k].unsqueeze(0), v[at:]]) for k, v in inputs.items()}


@pytest.mark.parametrize("left_padding", [False, True])
def test_all_padding_row_is_zero_user_embedding_and_leaves_other_rows_alone(left_padding):
    torch.manual_seed(0)
    tester = PinFMModelTester(hidden_dropout_prob=0.0, full_softmax=True)
    config, inputs = tester.prepare_config_and_inputs()
    inputs = to_left_padding(inputs) if left_padding else inputs
    empty = {k: torch.zeros(tester.seq_length, dtype=torch.long) for k in inputs}
    batch = with_row(inputs, empty, at=3)
    others = [i for i in range(tester.batch_size + 1) if i != 3]
    model = tester.pretraining_model(config).eval()
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    with torch.no_grad():
        alone = model(**inputs, labels=labels)
        got = model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100))
    for name in ("query_embeddings", "user_embedding", "last_hidden_state"):
        assert torch.isfinite(getattr(got, name)).all(), name
        torch.testing.assert_close(getattr(got, name)[others], getattr(alone, name), rtol=1e-5, atol=1e-5)
    assert torch.equal(got.user_embedding[3], torch.zeros(config.hidden_size))  # documented: zeros, not position 0
    torch.testing.assert_close(got.loss, alone.loss)  # the empty row adds no loss term
    encoder_out = model.pinfm(**batch)
    assert torch.equal(encoder_out.user_embedding[3], torch.zeros(config.hidden_size))


@pytest.mark.parametrize("left_padding", [False, True])
def test_user_embedding_only_runs_the_last_layer_at_the_last_event_with_the_same_results(left_padding):
    # DCAT's context pass needs every layer's keys and values and the user embedding, not the last layer elsewhere.
    torch.manual_seed(0)
    tester = PinFMModelTester(num_hidden_layers=3)
    config, inputs = tester.prepare_config_and_inputs()
    inputs = to_left_padding(inputs) if left_padding else inputs
    batch = with_row(inputs, {k: torch.zeros(tester.seq_length, dtype=torch.long) for k in inputs}, at=2)  # no events
    model = PinFMModel(config).eval()
    with torch.no_grad():
        full = model(**batch, return_key_values=True)
        only = model(**batch, return_key_values=True, user_embedding_only=True)
    assert only.last_hidden_state.shape == (tester.batch_size + 1, 1, config.hidden_size)
    torch.testing.assert_close(only.user_embedding, full.user_embedding, rtol=1e-5, atol=1e-6)
    assert torch.equal(only.user_embedding[2], torch.zeros(config.hidden_size))
    assert not torch.equal(only.user_embedding[0], torch.zeros(config.hidden_size))
    for (key, value), (full_key, full_value) in zip(only.key_values, full.key_values):
        torch.testing.assert_close(key, full_key)
        torch.testing.assert_close(value, full_value)
    with pytest.raises(ValueError, match="user_embedding_only"):
        model(**batch, user_embedding_only=True, output_hidden_states=True)


@pytest.mark.parametrize("fusion", ["early", "late"])
def test_ctr_row_without_history_and_row_without_any_token(fusion):
    from pinfm_hf import PinFMForCTR

    torch.manual_seed(0)
    tester = PinFMModelTester(batch_size=4, ctr_fusion=fusion, ctr_dropout=0.0, hidden_dropout_prob=0.0)
    config, inputs = tester.prepare_config_and_inputs()
    inputs = to_left_padding(inputs)  # each row's last real token is its candidate
    inputs["action_ids"][:, -1] = config.candidate_action_id
    model = PinFMForCTR(config).eval()
    T = tester.seq_length
    only_candidate = {k: torch.zeros(T, dtype=torch.long) for k in inputs}
    only_candidate.update(input_ids=torch.tensor([0] * (T - 1) + [9]), attention_mask=torch.tensor([0] * (T - 1) + [1]),
                          action_ids=torch.tensor([0] * (T - 1) + [1]), timestamps=torch.tensor([0] * (T - 1) + [10**9]))
    with torch.no_grad():
        alone = model(**inputs).logits
        got = model(**with_row(inputs, only_candidate, at=1))
    assert torch.isfinite(got.logits).all() and torch.equal(got.user_embedding[1], torch.zeros(config.hidden_size))
    torch.testing.assert_close(got.logits[[0, 2, 3, 4]], alone, rtol=1e-5, atol=1e-5)
    no_token = {k: torch.zeros(T, dtype=torch.long) for k in inputs}
    with pytest.raises(ValueError, match="Row 2 has no real token"):
        model(**with_row(inputs, no_token, at=2))
    # DCAT: a user without history among others; the others' scores are those without it.
    users = {k: v[:, :-1] for k, v in inputs.items()}
    candidates = torch.tensor([[5, 6], [7, 8], [9, 10], [11, 12]])
    no_history = {k: torch.zeros(T - 1, dtype=torch.long) for k in users}
    with torch.no_grad():
        expected = model.score_candidates(candidate_ids=candidates, **users)
        scores = model.score_candidates(candidate_ids=torch.cat([candidates, candidates[:1]]),
                                        **{k: torch.cat([v, no_history[k][None]]) for k, v in users.items()})
    assert torch.isfinite(scores).all()
    torch.testing.assert_close(scores[:4], expected, rtol=1e-5, atol=1e-5)


def test_empty_and_misshapen_inputs_are_clear_errors():
    tester = PinFMModelTester(batch_size=2, seq_length=3)
    config, inputs = tester.prepare_config_and_inputs()
    model = PinFMForPretraining(config).eval()
    empty = {k: v[:, :0] for k, v in inputs.items()}
    with pytest.raises(ValueError, match=r"`input_ids` has shape \(2, 0\): .*an empty history"):
        model(**empty)
    with pytest.raises(ValueError, match=r"`input_ids` has shape \(0, 3\)"):
        model(**{k: v[:0] for k, v in inputs.items()})
    with pytest.raises(ValueError, match=r"`input_ids` must be 2-D"):
        model(**{k: v[0] for k, v in inputs.items()})
    with pytest.raises(ValueError, match=r"`attention_mask` has shape \(2, 2\), but `input_ids` has \(2, 3\)"):
        model(**dict(inputs, attention_mask=inputs["attention_mask"][:, :2]))
    with pytest.raises(ValueError, match=r"`labels` has shape \(2, 2\)"):
        model(**inputs, labels=inputs["input_ids"][:, :2])
    with pytest.raises(ValueError, match=r"`end_timestamps` has 3 values for a batch of 2 rows"):
        model(**inputs, end_timestamps=torch.tensor([1, 2, 3]))


@pytest.mark.parametrize("tables", ["float", "hashed", "int8"])
def test_ids_outside_the_vocabulary_are_clear_errors(tables):
    overrides = {"hashed": dict(num_item_hash_tables=2, item_hash_table_size=101)}.get(tables, {})
    tester = PinFMModelTester(batch_size=2, seq_length=4, surface_vocab_size=3, **overrides)
    config, inputs = tester.prepare_config_and_inputs()
    model = PinFMForPretraining(config).eval()
    if tables == "int8":
        model.quantize_item_embeddings("int8")  # an id past a packed table would read other memory
    for bad in (config.item_vocab_size, -1):
        ids = inputs["input_ids"].clone()
        ids[1, 0] = bad
        with pytest.raises(ValueError, match=rf"Item ids hold id {bad}, outside .*\[0, 50\) \(`config.item_vocab_size`\)"):
            model(**dict(inputs, input_ids=ids))
    actions = inputs["action_ids"].clone()
    actions[0, 0] = config.action_vocab_size
    with pytest.raises(ValueError, match=r"`action_ids` hold id 6, .*`config.action_vocab_size`"):
        model(**dict(inputs, action_ids=actions))
    with pytest.raises(ValueError, match=r"`surface_ids` hold id 3, .*`config.surface_vocab_size`"):
        model(**inputs, surface_ids=torch.full_like(inputs["input_ids"], 3))
    with pytest.raises(ValueError, match="Item ids hold id 50"):
        model.score_items(torch.randn(2, config.projection_size), torch.tensor([4, 50]))
    labels = inputs["input_ids"].clone()
    labels[0, 2] = 50
    with pytest.raises(ValueError, match="Item ids hold id 50"):  # a label past the table, in the loss
        model(**inputs, labels=labels)


def test_timestamps_that_decrease_within_a_row_are_refused():
    tester = PinFMModelTester(batch_size=3, seq_length=5)
    config, inputs = tester.prepare_config_and_inputs()
    model = PinFMModel(config).eval()
    model(**inputs)  # right padding holds 0 after later events: padding is not checked
    model(**to_left_padding(inputs))
    model(**dict(inputs, timestamps=inputs["timestamps"][:, :1].expand(-1, 5) * inputs["attention_mask"]))  # ties
    swapped = inputs["timestamps"].clone()
    swapped[0, [1, 2]] = swapped[0, [2, 1]]
    with pytest.raises(ValueError, match=r"`timestamps` must not decrease within a sequence .*row 0 goes from \d+ to \d+ at position 2"):
        model(**dict(inputs, timestamps=swapped))


def test_score_candidates_bad_inputs():
    from pinfm_hf import PinFMForCTR

    tester = PinFMModelTester(batch_size=2, seq_length=3, ctr_fusion="late")
    config, users = tester.prepare_config_and_inputs()
    model = PinFMForCTR(config).eval()
    flat = torch.tensor([5, 6])
    with pytest.raises(ValueError, match=r"`candidate_user_index` holds -1, not a user row in \[0, 2\)"):
        model.score_candidates(candidate_ids=flat, candidate_user_index=torch.tensor([0, -1]), **users)
    with pytest.raises(ValueError, match=r"`candidate_user_index` holds 2"):
        model.score_candidates(candidate_ids=flat, candidate_user_index=torch.tensor([0, 2]), deduplicate=False, **users)
    with pytest.raises(ValueError, match=r"`candidate_ids` hold id 50, .*`config.item_vocab_size`"):
        model.score_candidates(candidate_ids=torch.tensor([[5], [50]]), **users)
    with pytest.raises(TypeError, match="`candidate_ids` must be an integer tensor"):
        model.score_candidates(candidate_ids=torch.tensor([[5.0], [6.0]]), **users)
    with pytest.raises(ValueError, match="`request_timestamps` has 3 values for 2 users"):
        model.score_candidates(candidate_ids=torch.tensor([[5], [6]]), request_timestamps=torch.tensor([1, 2, 3]), **users)
    with pytest.raises(ValueError, match=r"`candidate_surface_ids` has shape \(3,\), but `candidate_ids` has \(2, 1\)"):
        model.score_candidates(candidate_ids=torch.tensor([[5], [6]]), candidate_surface_ids=torch.tensor([1, 1, 1]), **users)


def test_from_pretrained_refuses_non_finite_weights(tmp_path):
    from safetensors.torch import load_file, save_file

    config, inputs = PinFMModelTester().prepare_config_and_inputs()
    model = PinFMForPretraining(config).eval()
    model.save_pretrained(tmp_path)
    loaded, info = PinFMForPretraining.from_pretrained(tmp_path, output_loading_info=True)  # healthy: loads as before
    assert isinstance(loaded, PinFMForPretraining) and not info["missing_keys"]
    weights = load_file(tmp_path / "model.safetensors")
    weights["pinfm.norm.weight"][0] = float("nan")
    weights["pinfm.layers.1.mlp.up_proj.weight"][2, 3] = float("-inf")
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    for load in (PinFMForPretraining.from_pretrained, AutoModelForPreTraining.from_pretrained, AutoModel.from_pretrained):
        with pytest.raises(ValueError, match=rf"{tmp_path / 'model.safetensors'} holds 2 non-finite \(NaN/inf\) tensor"):
            load(tmp_path)
