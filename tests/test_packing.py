"""Packed rows (several users' sequences per row, `position_ids` restarting at each) against one padded user per row:
the same hidden states, user embeddings, losses, gradients, queries and evaluation figures."""

import dataclasses

import pytest
import torch

from pinfm_hf import PinFMConfig, PinFMForPretraining, PinFMModel, PretrainingObjective
from pinfm_hf.data import PinFMDataCollator
from pinfm_hf.embeddings_pinfm import packed_sequence_ends, sequence_index
from pinfm_hf.evaluation import history_mask


OBJECTIVES = {
    "next_token_sampled": PretrainingObjective(num_negatives=32),
    # The multi-token pairs outnumber the positions, so they are subsampled: the same pairs must be drawn.
    "all_losses_sampled": PretrainingObjective(
        multi_token_loss_weight=0.5, future_token_loss_weight=0.25, future_token_input_length=4, num_negatives=32
    ),
    "all_losses_full_softmax": PretrainingObjective(
        multi_token_loss_weight=0.5, future_token_loss_weight=0.25, future_token_input_length=4, full_softmax=True
    ),
}


def make_config(**overrides) -> PinFMConfig:
    return PinFMConfig(
        item_vocab_size=60, action_vocab_size=6, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=37, use_action_embeddings=True, use_time_features=True, use_input_mlp=True,
        hidden_dropout_prob=0.0, attention_dropout=0.0, **overrides,
    )


def make_features(num_users: int = 11, seed: int = 1, longest: int = 19) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    features = []
    for _ in range(num_users):
        n = int(torch.randint(1, longest + 1, (1,), generator=g))
        timestamps = (1_000_000 + torch.randint(0, 50_000, (n,), generator=g).cumsum(0)).tolist()
        features.append({
            "input_ids": torch.randint(4, 60, (n,), generator=g).tolist(),
            "action_ids": torch.randint(2, 6, (n,), generator=g).tolist(),
            "timestamps": timestamps,
            "target_ids": int(torch.randint(4, 60, (1,), generator=g)),
            "target_timestamps": timestamps[-1] + 3_600,
        })
    return features


def run(model: PinFMForPretraining, batch: dict) -> tuple:
    model.zero_grad()
    torch.manual_seed(5)  # the negatives and the multi-token subsample draw from it
    outputs = model(**batch)
    outputs.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return outputs, grads


@pytest.mark.parametrize("objective", list(OBJECTIVES))
@pytest.mark.parametrize("absolute_positions", [False, True])
def test_packed_rows_give_the_padded_hidden_states_losses_and_gradients(objective, absolute_positions):
    torch.manual_seed(0)
    model = PinFMForPretraining(make_config(use_absolute_position_embeddings=absolute_positions, max_position_embeddings=24))
    model.objective = dataclasses.replace(OBJECTIVES[objective])
    features = [{k: v for k, v in f.items() if not k.startswith("target")} for f in make_features()]
    padded = PinFMDataCollator(return_labels=True)(features)
    packed = PinFMDataCollator(return_labels=True, pack_length=24)(features)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]  # several users per row
    assert int(packed["attention_mask"].sum()) == int(padded["attention_mask"].sum())

    padded_out, padded_grads = run(model, padded)
    packed_out, packed_grads = run(model, packed)
    hidden = lambda out, batch: out.last_hidden_state[batch["attention_mask"].bool()]  # noqa: E731 (row-major events)
    torch.testing.assert_close(hidden(packed_out, packed), hidden(padded_out, padded), atol=1e-5, rtol=0)
    torch.testing.assert_close(packed_out.user_embedding, padded_out.user_embedding, atol=1e-5, rtol=0)
    for name in ("loss", "next_token_loss", "multi_token_loss", "future_token_loss"):
        if getattr(padded_out, name) is not None:
            torch.testing.assert_close(getattr(packed_out, name), getattr(padded_out, name), atol=1e-5, rtol=1e-6)
    assert packed_grads.keys() == padded_grads.keys()
    for name in padded_grads:
        torch.testing.assert_close(packed_grads[name], padded_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_first_fit_packed_rows_give_the_padded_losses_and_gradients():
    torch.manual_seed(0)
    model = PinFMForPretraining(make_config())
    model.objective = dataclasses.replace(OBJECTIVES["all_losses_full_softmax"])
    features = [{k: v for k, v in f.items() if not k.startswith("target")} for f in make_features(num_users=16)]
    padded = PinFMDataCollator(return_labels=True)(features)
    in_order = PinFMDataCollator(return_labels=True, pack_length=24)(features)
    packed = PinFMDataCollator(return_labels=True, pack_length=24, pack_first_fit=True)(features)
    assert packed["input_ids"].shape[0] < in_order["input_ids"].shape[0]  # fuller rows than in order
    assert int(packed["attention_mask"].sum()) == int(padded["attention_mask"].sum())

    padded_out, padded_grads = run(model, padded)
    packed_out, packed_grads = run(model, packed)
    for name in ("loss", "next_token_loss", "multi_token_loss", "future_token_loss"):
        torch.testing.assert_close(getattr(packed_out, name), getattr(padded_out, name), atol=1e-5, rtol=1e-6)
    for name in padded_grads:
        torch.testing.assert_close(packed_grads[name], padded_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    # The same user embeddings, in the packed order of the sequences (a permutation of the input order).
    distances = torch.cdist(packed_out.user_embedding, padded_out.user_embedding)
    order = distances.argmin(dim=1)
    assert sorted(order.tolist()) == list(range(len(features))) and order.tolist() != sorted(order.tolist())
    torch.testing.assert_close(packed_out.user_embedding, padded_out.user_embedding[order], atol=1e-5, rtol=0)


def test_packed_sequences_do_not_see_each_other():
    model = PinFMModel(make_config()).eval()
    features = make_features(num_users=6)
    packed = PinFMDataCollator(pack_length=40)(features)
    packed.pop("target_ids"), packed.pop("target_timestamps")
    ends = packed_sequence_ends(packed["attention_mask"].bool(), packed["position_ids"])
    row, first_end = (int(i) for i in ends.nonzero()[0])
    assert packed["position_ids"][row, first_end + 1] == 0  # a second sequence follows in the same row
    before = model(**packed).last_hidden_state
    changed = {k: v.clone() for k, v in packed.items()}
    changed["input_ids"][row, : first_end + 1] = 7  # rewrite the first user's history
    changed["timestamps"][row, : first_end + 1] -= 10_000_000
    after = model(**changed).last_hidden_state
    assert not torch.allclose(before[row, : first_end + 1], after[row, : first_end + 1])
    torch.testing.assert_close(before[row, first_end + 1 :], after[row, first_end + 1 :])  # the next user: unchanged


def test_packed_queries_take_the_request_time_of_each_sequence():
    torch.manual_seed(0)
    model = PinFMForPretraining(make_config()).eval()
    features = make_features()
    queries = []
    for pack_length in (None, 30):
        batch = PinFMDataCollator(pack_length=pack_length)(features)
        batch.pop("target_ids")
        batch["end_timestamps"] = batch.pop("target_timestamps")
        queries.append(model.next_item_query(**batch))
    assert queries[1].shape == (len(features), model.config.projection_size)
    torch.testing.assert_close(queries[1], queries[0], atol=1e-5, rtol=0)
    batch["end_timestamps"] = batch["end_timestamps"] + 10_000_000  # a later request changes the last gap only
    assert not torch.allclose(model.next_item_query(**batch), queries[1])


def test_packed_history_mask_and_sequence_index_follow_the_sequences():
    features = make_features(num_users=5)
    padded, packed = PinFMDataCollator()(features), PinFMDataCollator(pack_length=40)(features)
    expected = history_mask(padded["input_ids"], padded["attention_mask"], 60)
    got = history_mask(packed["input_ids"], packed["attention_mask"], 60, packed["position_ids"])
    assert torch.equal(got, expected)
    index = sequence_index(packed["attention_mask"].bool(), packed["position_ids"])
    flat = index[packed["attention_mask"].bool()]
    assert flat.tolist() == [i for i, f in enumerate(features) for _ in f["input_ids"]]


def test_bad_position_ids_and_end_timestamps_are_clear_errors():
    model = PinFMModel(make_config()).eval()
    batch = PinFMDataCollator(pack_length=40)(make_features(num_users=4))
    batch.pop("target_ids")
    end_timestamps = batch.pop("target_timestamps")
    skipped = {**batch, "position_ids": batch["position_ids"].clone()}
    skipped["position_ids"][0, 2] += 1  # a gap within a sequence
    with pytest.raises(ValueError, match=r"`position_ids` must restart at 0 .* row 0 has \d+ at position 2"):
        model(**skipped)
    with pytest.raises(ValueError, match="`end_timestamps` has 3 values for 4 packed sequences"):
        model(**batch, end_timestamps=end_timestamps[:3])
    with pytest.raises(ValueError, match="`position_ids` must be an integer tensor of shape"):
        model(**{**batch, "position_ids": batch["position_ids"][:, :-1]})
    backwards = {**batch, "timestamps": batch["timestamps"].clone()}
    backwards["timestamps"][0, 1] = backwards["timestamps"][0, 0] - 1
    with pytest.raises(ValueError, match="must not decrease within a sequence"):
        model(**backwards)
