"""PinFMForCTR: early and late fusion, side features, the auxiliary loss, padding and save/load."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification

from pinfm_hf import PinFMConfig, PinFMForCTR, PinFMForPretraining, PretrainingObjective
from pinfm_hf.modeling_pinfm_ctr import history_action_counts, history_action_recency, randomize_candidate_ids


VOCAB, ACTIONS = 60, 6


def make_config(**overrides) -> PinFMConfig:
    defaults = dict(
        item_vocab_size=VOCAB, action_vocab_size=ACTIONS, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        hidden_dropout_prob=0.0, ctr_feature_vocab_size=12, ctr_feature_slots=[3, 1],
        ctr_feature_embedding_size=4, ctr_dropout=0.0,
    )
    return PinFMConfig(**{**defaults, **overrides})


def make_batch(batch_size: int = 4, length: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, VOCAB, (batch_size, length), generator=g)
    action_ids = torch.randint(2, ACTIONS, (batch_size, length), generator=g)
    action_ids[:, -1] = 1  # the candidate marker
    attention_mask = torch.ones(batch_size, length, dtype=torch.long)
    attention_mask[0, :3] = 0  # a left-padded short history
    input_ids[0, :3] = 0
    timestamps = torch.arange(length).repeat(batch_size, 1) * 3600 + 1_000_000
    side = torch.randint(1, 12, (batch_size, 4), generator=g)
    side[:, 2] = 0  # an unused multi-value slot
    return dict(input_ids=input_ids, action_ids=action_ids, attention_mask=attention_mask, timestamps=timestamps,
                side_feature_ids=side)


def right_padded(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same rows with the padding moved to the right."""
    out = {k: v.clone() for k, v in batch.items()}
    for row in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][row].sum())
        for key in ("input_ids", "action_ids", "attention_mask", "timestamps"):
            values = batch[key][row]
            out[key][row] = torch.cat([values[-n:], torch.zeros_like(values[:-n])]) if n < len(values) else values
    return out


@pytest.mark.parametrize("fusion", ["early", "late"])
@pytest.mark.parametrize("head", ["mlp", "dcn"])
def test_logits_loss_and_padding_side(fusion, head):
    torch.manual_seed(0)
    model = PinFMForCTR(make_config(ctr_fusion=fusion, ctr_head=head)).eval()
    batch = make_batch()
    labels = torch.tensor([1.0, 0.0, 1.0, 0.0])
    out = model(**batch, labels=labels)
    assert out.logits.shape == (4,)
    torch.testing.assert_close(out.loss, F.binary_cross_entropy_with_logits(out.logits, labels))
    torch.testing.assert_close(model(**right_padded(batch)).logits, out.logits, atol=1e-5, rtol=1e-5)
    out.loss.backward()
    assert model.ctr_head.mlp[0].weight.grad.abs().sum() > 0
    assert model.ctr_feature_embeddings.embeddings.weight.grad.abs().sum() > 0


def test_early_fusion_reads_the_candidate_and_late_fusion_user_embedding_ignores_it():
    torch.manual_seed(0)
    model = PinFMForCTR(make_config(ctr_fusion="early")).eval()
    batch = make_batch()
    other = {k: v.clone() for k, v in batch.items()}
    other["input_ids"][:, -1] = (other["input_ids"][:, -1] + 1 - 4) % (VOCAB - 4) + 4  # another candidate
    a, b = model(**batch), model(**other)
    assert not torch.allclose(a.logits, b.logits)
    # The encoder is causal: the output before the candidate (late fusion's user embedding) cannot see it.
    torch.testing.assert_close(a.user_embedding, b.user_embedding)
    assert not torch.allclose(a.candidate_hidden_state, b.candidate_hidden_state)


def test_late_fusion_with_an_empty_history():
    torch.manual_seed(0)
    model = PinFMForCTR(make_config(ctr_fusion="late")).eval()
    batch = make_batch()
    batch["attention_mask"][0, :-1] = 0
    batch["input_ids"][0, :-1] = 0
    out = model(**batch)
    assert torch.isfinite(out.logits).all()
    assert out.user_embedding[0].abs().sum() == 0  # nothing to summarise yet


def test_side_features_pool_per_field_and_padding_slots_do_not_count():
    torch.manual_seed(0)
    model = PinFMForCTR(make_config()).eval()
    pooling = model.ctr_feature_embeddings
    ids = torch.tensor([[5, 7, 0, 9]])
    table = pooling.embeddings.weight
    expected = torch.cat([(table[5] + table[7]) / 2, table[9]])
    torch.testing.assert_close(pooling(ids)[0], expected)
    with pytest.raises(ValueError, match="3 slot columns, the config expects 4"):
        pooling(ids[:, :3])
    batch = make_batch()
    batch.pop("side_feature_ids")
    with pytest.raises(ValueError, match="side_feature_ids"):
        model(**batch)


def test_auxiliary_next_token_loss_trains_the_retrieval_head():
    torch.manual_seed(0)
    labels = torch.tensor([1.0, 0.0, 1.0, 0.0])
    plain = PinFMForCTR(make_config())
    out = plain(**make_batch(), labels=labels)
    assert out.aux_loss is None and torch.equal(out.loss, out.ctr_loss)
    out.loss.backward()
    assert plain.next_item_head is None  # no auxiliary loss: the ranker holds no next-item head at all
    torch.manual_seed(0)
    aux = PinFMForCTR(make_config(ctr_aux_loss_weight=0.5))
    aux.objective = PretrainingObjective(num_negatives=8)
    out = aux(**make_batch(), labels=labels)
    assert out.aux_loss > 0
    torch.testing.assert_close(out.loss, out.ctr_loss + 0.5 * out.aux_loss)
    out.loss.backward()
    assert aux.next_item_head.query_proj.weight.grad.abs().sum() > 0


def test_loads_a_pretraining_checkpoint_and_round_trips(tmp_path):
    torch.manual_seed(0)
    pretrained = PinFMForPretraining(make_config(ctr_feature_vocab_size=0, ctr_feature_slots=None))
    pretrained.save_pretrained(tmp_path / "base")
    model = PinFMForCTR.from_pretrained(tmp_path / "base", ctr_feature_vocab_size=12, ctr_feature_slots=[3, 1]).eval()
    assert model.next_item_head is None  # without the auxiliary loss the ranker takes the encoder only
    for name, value in pretrained.state_dict().items():
        if not name.startswith("next_item_head."):
            torch.testing.assert_close(model.state_dict()[name], value, msg=name)
    model.save_pretrained(tmp_path / "ctr")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ctr").eval()
    assert isinstance(reloaded, PinFMForCTR)
    batch = make_batch()
    torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits)


def test_config_rejects_bad_ctr_fields():
    with pytest.raises(ValueError, match="ctr_fusion"):
        make_config(ctr_fusion="middle")
    with pytest.raises(ValueError, match="ctr_head"):
        make_config(ctr_head="wide")
    with pytest.raises(ValueError, match="given together"):
        make_config(ctr_feature_slots=None)


# ----- DCAT: deduplicated cross-attention scoring -----


def naive_scores(model, users: dict, candidate_ids, candidate_user_index, request_ts, side=None) -> torch.Tensor:
    """Each candidate appended to its user's (left-padded) history and encoded in full."""
    rows = []
    for n, (item, u) in enumerate(zip(candidate_ids.tolist(), candidate_user_index.tolist())):
        valid = users["attention_mask"][u].bool()
        row = dict(
            input_ids=torch.cat([users["input_ids"][u][valid], torch.tensor([item])]),
            action_ids=torch.cat([users["action_ids"][u][valid], torch.tensor([1])]),
            timestamps=torch.cat([users["timestamps"][u][valid], request_ts[u : u + 1]]),
        )
        width = users["input_ids"].shape[1] + 1
        pad = width - len(row["input_ids"])
        batch = {k: torch.cat([torch.zeros(pad, dtype=torch.long), v]).unsqueeze(0) for k, v in row.items()}
        batch["attention_mask"] = (torch.arange(width) >= pad).long().unsqueeze(0)
        if side is not None:
            batch["side_feature_ids"] = side[n : n + 1]
        rows.append(model(**batch).logits)
    return torch.cat(rows)


def random_users(num_users: int = 5, length: int = 9, seed: int = 0, right_padding: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, length + 1, (num_users,), generator=g)
    lengths[0] = 0  # one user with no history yet
    lengths[1] = length
    ids = torch.randint(4, VOCAB, (num_users, length), generator=g)
    actions = torch.randint(2, ACTIONS, (num_users, length), generator=g)
    times = torch.randint(0, 10**6, (num_users, length), generator=g).sort(dim=1).values
    positions = torch.arange(length)
    valid = positions < lengths[:, None] if right_padding else positions >= (length - lengths)[:, None]
    return dict(input_ids=ids * valid, action_ids=actions * valid, timestamps=times * valid, attention_mask=valid.long())


@pytest.mark.parametrize("fusion", ["early", "late"])
@pytest.mark.parametrize("right_padding", [False, True])
@pytest.mark.parametrize("absolute_positions", [False, True])
def test_dcat_scores_equal_the_naive_path(fusion, right_padding, absolute_positions):
    torch.manual_seed(0)
    config = make_config(ctr_fusion=fusion, ctr_head="dcn", use_absolute_position_embeddings=absolute_positions)
    model = PinFMForCTR(config).eval()
    users = random_users(right_padding=right_padding)
    g = torch.Generator().manual_seed(1)
    request_ts = users["timestamps"].amax(dim=1) + torch.randint(0, 10**5, (5,), generator=g)
    # Ragged candidates, users repeated, one user (index 3) with none.
    user_index = torch.tensor([0, 1, 1, 2, 4, 4, 4, 0, 2, 1])
    candidates = torch.randint(4, VOCAB, (10,), generator=g)
    side = torch.randint(0, 12, (10, 4), generator=g)
    with torch.no_grad():
        dcat = model.score_candidates(
            candidate_ids=candidates, candidate_user_index=user_index, request_timestamps=request_ts,
            candidate_side_feature_ids=side, **users,
        )
        naive = naive_scores(model, users, candidates, user_index, request_ts, side)
    torch.testing.assert_close(dcat, naive, atol=1e-4, rtol=1e-4)


def test_dcat_dense_candidates_and_repeated_users_are_encoded_once(monkeypatch):
    torch.manual_seed(0)
    model = PinFMForCTR(make_config(ctr_feature_vocab_size=0, ctr_feature_slots=None)).eval()
    users = random_users(num_users=3)
    # Rows 3 and 4 repeat users 1 and 2: the context pass must see 3 distinct users, not 5.
    repeated = {k: torch.cat([v, v[1:3]]) for k, v in users.items()}
    candidates = torch.randint(4, VOCAB, (5, 7), generator=torch.Generator().manual_seed(2))
    candidates[3] = candidates[1]
    seen = []
    original = model.pinfm.forward
    monkeypatch.setattr(model.pinfm, "forward", lambda *a, **k: seen.append(a[0].shape[0]) or original(*a, **k))
    request_ts = repeated["timestamps"].amax(dim=1) + 60
    with torch.no_grad():
        dcat = model.score_candidates(candidate_ids=candidates, request_timestamps=request_ts, **repeated)
        undeduplicated = model.score_candidates(candidate_ids=candidates, request_timestamps=request_ts, deduplicate=False, **repeated)
    assert seen == [3, 5]
    assert dcat.shape == (5, 7)
    torch.testing.assert_close(dcat, undeduplicated)
    torch.testing.assert_close(dcat[3], dcat[1])
    with torch.no_grad():
        naive = naive_scores(model, repeated, candidates.reshape(-1), torch.arange(5).repeat_interleave(7), request_ts)
    torch.testing.assert_close(dcat.reshape(-1), naive, atol=1e-4, rtol=1e-4)


def test_forward_with_deduplicated_histories_matches_and_trains(shared_data_dir):
    """Real ML-1M impressions: same-second ratings share a history; DCAT gives the plain path's logits and loss."""
    import pyarrow as pa

    from pinfm_hf import PinFMTokenizer
    from pinfm_hf.data import CTR_USE_CASES, CTRDataset, PinFMDataCollator, build_ctr_samples, load_dataset_by_name

    events = load_dataset_by_name("ml-1m", shared_data_dir)
    use_case = CTR_USE_CASES["like"]
    sequences, samples = build_ctr_samples(events, positive_actions=use_case.positive_actions,
                                           negative_actions=use_case.negative_actions)
    samples = samples.slice(0, 400)  # the first users' impressions, in order: many share (history, time)
    tokenizer = PinFMTokenizer.from_events(events, num_hash_buckets=16)
    data = CTRDataset(sequences, samples, tokenizer, max_history=30)
    batch = PinFMDataCollator(pad_token_id=0, padding_side="left", max_length=31)([data[i] for i in range(len(data))])
    labels, _ = batch.pop("label"), batch.pop("user_index")
    key = pa.table({"u": samples["user_index"], "h": samples["history_length"], "t": samples["timestamp"]})
    assert key.group_by(["u", "h", "t"]).aggregate([]).num_rows < 0.8 * len(samples)  # real sharing to exploit

    torch.manual_seed(0)
    config = make_config(item_vocab_size=len(tokenizer), action_vocab_size=tokenizer.action_vocab_size,
                         ctr_feature_vocab_size=0, ctr_feature_slots=None, ctr_aux_loss_weight=0.3)
    model = PinFMForCTR(config)
    model.objective = PretrainingObjective(num_negatives=16)
    plain = model(**batch, labels=labels)
    dcat = model(**batch, labels=labels, deduplicate_histories=True)
    torch.testing.assert_close(dcat.logits, plain.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dcat.ctr_loss, plain.ctr_loss, atol=1e-5, rtol=1e-5)
    assert dcat.aux_loss is not None and torch.isfinite(dcat.aux_loss)
    dcat.loss.backward()
    assert model.pinfm.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


# ----- cold start -----


def test_candidate_item_features_reach_the_candidate_token_and_dcat_agrees():
    torch.manual_seed(0)
    model = PinFMForCTR(make_config(ctr_candidate_item_features=True, ctr_item_feature_fields=[0])).eval()
    batch = make_batch()
    other = {k: v.clone() for k, v in batch.items()}
    other["side_feature_ids"][:, 0] = (other["side_feature_ids"][:, 0] % 11) + 1  # another genre, same item id
    a, b = model(**batch), model(**other)
    # The features entered the sequence model, not only the head: the candidate's encoder output moved.
    assert not torch.allclose(a.candidate_hidden_state, b.candidate_hidden_state)
    torch.testing.assert_close(a.user_embedding, b.user_embedding)  # the history is untouched
    with torch.no_grad():
        dcat = model(**batch, deduplicate_histories=True)
    torch.testing.assert_close(dcat.logits, a.logits, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="ctr_item_feature_fields"):
        make_config(ctr_candidate_item_features=True)


def test_young_item_dropout_drops_only_young_items_in_training():
    torch.manual_seed(0)
    model = PinFMForCTR(make_config(ctr_young_item_dropout=0.9, ctr_young_item_age_days=7.0)).train()
    batch = make_batch(batch_size=64)
    young, old = torch.zeros(64, dtype=torch.long), torch.full((64,), 30 * 86400)

    def head_inputs(age):
        seen = []
        handle = model.ctr_head.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
        model(**batch, candidate_age=age)
        handle.remove()
        return seen[0][:, : model.config.hidden_size]  # the sequence output part of the head input

    dropped = (head_inputs(young).abs().sum(-1) == 0).float().mean()
    assert 0.75 < dropped < 1.0  # about 90% of brand-new items lose the sequence output
    assert (head_inputs(old).abs().sum(-1) > 0).all()  # items older than 7 days never do
    model.eval()
    assert (head_inputs(young).abs().sum(-1) > 0).all()  # and nothing is dropped at inference


def test_randomize_candidate_ids_touches_only_candidates():
    ids = torch.tensor([[0, 0, 5, 6, 7], [4, 5, 6, 7, 8], [9, 9, 0, 0, 0]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])  # left, none, right padding
    assert randomize_candidate_ids(ids, mask, fraction=0.0, first_bucket_id=100, num_buckets=10) is ids
    torch.manual_seed(0)
    out = randomize_candidate_ids(ids, mask, fraction=1.0, first_bucket_id=100, num_buckets=10)
    candidates = torch.tensor([[0, 4], [1, 4], [2, 1]])
    for row, col in candidates.tolist():
        assert 100 <= out[row, col] < 110
        out[row, col] = ids[row, col]
    assert torch.equal(out, ids)  # histories untouched
    torch.manual_seed(0)
    many = randomize_candidate_ids(torch.full((4000, 3), 5), torch.ones(4000, 3), fraction=0.1, first_bucket_id=100, num_buckets=10)
    assert 0.08 < (many[:, -1] >= 100).float().mean() < 0.12 and (many[:, :-1] == 5).all()
    with pytest.raises(ValueError, match="hash buckets"):
        randomize_candidate_ids(ids, mask, fraction=0.5, first_bucket_id=100, num_buckets=0)


def test_item_bias_starts_at_zero_and_adds_the_candidates_own_scalar():
    torch.manual_seed(0)
    model = PinFMForCTR(make_config(ctr_item_bias=True)).eval()
    assert torch.count_nonzero(model.ctr_item_bias.weight) == 0  # no item preferred before training
    batch = make_batch()
    candidates = batch["input_ids"][:, -1]
    with torch.no_grad():
        before = model(**batch).logits
        model.ctr_item_bias.weight[candidates[1]] = 2.5
        after = model(**batch).logits
        dcat = model(**batch, deduplicate_histories=True).logits
    torch.testing.assert_close(after, before + 2.5 * (candidates == candidates[1]).float())
    torch.testing.assert_close(dcat, after, atol=1e-5, rtol=1e-5)
    assert PinFMForCTR(make_config()).ctr_item_bias is None  # off by default


def test_history_counts_per_action_and_on_the_candidate_reach_the_head():
    batch = make_batch()
    ids, actions = batch["input_ids"], batch["action_ids"]
    # Row 1: the candidate occurs twice in its history (actions 2 and 3); a padded position with its id does not count.
    ids[1, 1], actions[1, 1] = ids[1, -1], 2
    ids[1, 4], actions[1, 4] = ids[1, -1], 3
    ids[0, 5], actions[0, 5] = ids[0, -1], 2  # row 0: once, among its real events
    ids[0, 0] = ids[0, -1]  # ... and once in its padding
    history = batch["attention_mask"].bool().clone()
    history[:, -1] = False
    rows = torch.arange(4)
    counts = history_action_counts(ids, actions, history, ids[:, -1], rows, ACTIONS).expm1().round()
    expected = torch.zeros(4, 2 * ACTIONS)
    for row in range(4):  # by hand
        for t in range(ids.shape[1] - 1):
            if history[row, t]:
                expected[row, actions[row, t]] += 1
                if ids[row, t] == ids[row, -1]:
                    expected[row, ACTIONS + actions[row, t]] += 1
    assert expected[1, ACTIONS + 2] >= 1 and expected[1, ACTIONS + 3] >= 1 and expected[0, ACTIONS:].sum() >= 1
    torch.testing.assert_close(counts, expected)
    # Candidates grouped by user (DCAT): each compared with its own user's history.
    swapped = history_action_counts(ids, actions, history, ids[[1, 0], -1], torch.tensor([1, 0]), ACTIONS).expm1().round()
    torch.testing.assert_close(swapped, expected[[1, 0]])

    torch.manual_seed(0)
    model = PinFMForCTR(make_config(ctr_history_count_features=True)).eval()
    assert model.ctr_head.mlp[0].in_features == 16 + 2 * 4 + 2 * ACTIONS  # encoder output, 2 side-feature fields, counts
    with torch.no_grad():
        plain = model(**batch).logits
        dcat = model(**batch, deduplicate_histories=True).logits
        torch.testing.assert_close(dcat, plain, atol=1e-5, rtol=1e-5)
        first = model.ctr_head.mlp[0]
        first.weight[:, -ACTIONS:] += 1.0  # the candidate-match columns: only rows whose candidate is in their history move
        changed = model(**batch).logits
    has_match = expected[:, ACTIONS:].sum(dim=1) > 0
    assert has_match[:2].all()
    assert torch.equal(~torch.isclose(changed, plain), has_match)


def test_history_recency_per_action_and_on_the_candidate_reach_the_head():
    batch = make_batch()
    ids, actions, times = batch["input_ids"], batch["action_ids"], batch["timestamps"]
    ids[1, 1], actions[1, 1] = ids[1, -1], 2  # row 1: the candidate twice in its history, with action 2 both times
    ids[1, 4], actions[1, 4] = ids[1, -1], 2
    ids[0, 0] = ids[0, -1]  # row 0: the candidate only in its padding, which does not count
    history = batch["attention_mask"].bool().clone()
    history[:, -1] = False
    rows = torch.arange(4)
    request = times[:, -1]
    got = history_action_recency(ids, actions, times, history, request, ids[:, -1], rows, ACTIONS)
    expected = torch.zeros(4, 2 * ACTIONS)
    for row in range(4):  # by hand: the latest event of each kind, its age at the request
        for t in range(ids.shape[1] - 1):
            if history[row, t]:
                age = math.log1p(float(request[row] - times[row, t]))
                expected[row, actions[row, t]] = age  # times increase along the row: the last one wins
                if ids[row, t] == ids[row, -1]:
                    expected[row, ACTIONS + actions[row, t]] = age
    assert expected[1, ACTIONS + 2] > 0 and expected[0, ACTIONS:].sum() == 0 and (expected[:, :ACTIONS] > 0).any()
    torch.testing.assert_close(got, expected)
    # Per user request times (DCAT): each candidate against its own user's history and request.
    swapped = history_action_recency(ids, actions, times, history, request, ids[[1, 0], -1], torch.tensor([1, 0]), ACTIONS)
    torch.testing.assert_close(swapped, expected[[1, 0]])

    torch.manual_seed(0)
    model = PinFMForCTR(make_config(ctr_history_count_features=True, ctr_history_recency_features=True)).eval()
    assert model.ctr_head.mlp[0].in_features == 16 + 2 * 4 + 4 * ACTIONS  # encoder output, side features, counts, recency
    with torch.no_grad():
        plain = model(**batch).logits
        torch.testing.assert_close(model(**batch, deduplicate_histories=True).logits, plain, atol=1e-5, rtol=1e-5)
        model.ctr_head.mlp[0].weight[:, -ACTIONS:] += 1.0  # the candidate-recency columns
        changed = model(**batch).logits
    assert torch.equal(~torch.isclose(changed, plain), expected[:, ACTIONS:].sum(dim=1) > 0)
    with pytest.raises(ValueError, match="`timestamps` are required"):
        model(**{k: v for k, v in batch.items() if k != "timestamps"})


def test_history_counts_without_actions_are_refused_clearly():
    # An encoder without action embeddings still needs the actions to count them.
    model = PinFMForCTR(make_config(ctr_history_count_features=True, use_action_embeddings=False)).eval()
    batch = make_batch()
    batch.pop("action_ids")
    with pytest.raises(ValueError, match="`action_ids` are required: .*ctr_history_count_features"):
        model(**batch)


def genre_table(seed: int = 0) -> torch.Tensor:
    """A random item -> (3 genre slots) table over side-feature ids 2..11, 0-padded; specials know nothing."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randint(2, 12, (VOCAB, 3), generator=g)
    table[torch.rand(VOCAB, 3, generator=g) < 0.4] = 0
    table[:4] = 0
    return table


def test_history_field_matches_count_events_sharing_a_genre_with_the_candidate_and_reach_the_head():
    batch = make_batch()
    ids, actions = batch["input_ids"], batch["action_ids"]
    table = genre_table()
    side = batch["side_feature_ids"]
    side[:, :3] = table[ids[:, -1]]  # field 0 (3 slots) is the candidate item's genres, as the encoder gives them
    side[3, :3] = torch.tensor([1, 0, 0])  # row 3: an unknown genre (id 1), which matches nothing
    table[ids[3, 2]] = torch.tensor([1, 0, 0])  # ... even an event whose genre is unknown too
    history = batch["attention_mask"].bool().clone()
    history[:, -1] = False
    expected = torch.zeros(4, ACTIONS)
    for row in range(4):  # by hand: per action, events of the row's history with a genre in common with its candidate
        wanted = {int(v) for v in side[row, :3] if v > 1}
        for t in range(ids.shape[1] - 1):
            if history[row, t] and wanted & {int(v) for v in table[ids[row, t]] if v > 1}:
                expected[row, actions[row, t]] += 1
    assert expected[:3].sum() > 0 and expected[3].sum() == 0

    torch.manual_seed(0)
    model = PinFMForCTR(make_config(ctr_history_count_features=True, ctr_history_field_match_features=True,
                                    ctr_item_feature_fields=[0])).eval()
    assert model.ctr_head.mlp[0].in_features == 16 + 2 * 4 + 2 * ACTIONS + ACTIONS  # + per action, genre matches
    with torch.no_grad():
        blank = model(**batch).logits  # no item's genres known yet: no event matches
        model.set_item_features(torch.arange(VOCAB), table)
        features = model.history_counts(ids, actions, history, ids[:, -1], torch.arange(4), candidate_side_feature_ids=side)
        torch.testing.assert_close(features[:, 2 * ACTIONS :].expm1().round(), expected)
        plain = model(**batch).logits
        torch.testing.assert_close(model(**batch, deduplicate_histories=True).logits, plain, atol=1e-5, rtol=1e-5)
    assert torch.equal(~torch.isclose(plain, blank), expected.sum(dim=1) > 0)
    # Without side features nothing says what the candidate is: a clear error, not a silent zero.
    with pytest.raises(ValueError, match="`side_feature_ids` are required"):
        model.history_counts(ids, actions, history, ids[:, -1], torch.arange(4))
    with pytest.raises(ValueError, match=r"must have shape \(2, 3\)"):
        model.set_item_features(torch.tensor([4, 5]), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="needs `ctr_item_feature_fields`"):
        make_config(ctr_history_field_match_features=True)


def test_the_item_field_table_is_saved_with_the_model(tmp_path):
    torch.manual_seed(0)
    config = make_config(ctr_history_field_match_features=True, ctr_item_feature_fields=[0])
    model = PinFMForCTR(config).eval()
    model.set_item_features(torch.arange(VOCAB), genre_table())
    batch = make_batch()
    batch["side_feature_ids"][:, :3] = genre_table()[batch["input_ids"][:, -1]]
    model.save_pretrained(tmp_path)
    reloaded = PinFMForCTR.from_pretrained(tmp_path).eval()
    assert torch.equal(reloaded.ctr_item_features.item_feature_ids, model.ctr_item_features.item_feature_ids)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits)


def test_history_field_matches_read_a_later_fields_columns():
    # Field 1 (one slot, after field 0's three): its column in `side_feature_ids` is 3, in the table 0.
    batch = make_batch()
    ids, actions = batch["input_ids"], batch["action_ids"]
    category = (torch.arange(VOCAB) % 3 + 2).view(-1, 1)  # three categories: events share them often
    batch["side_feature_ids"][:, 3:] = category[ids[:, -1]]
    history = batch["attention_mask"].bool().clone()
    history[:, -1] = False
    expected = torch.zeros(4, ACTIONS)
    for row in range(4):
        for t in range(ids.shape[1] - 1):
            if history[row, t] and category[ids[row, -1], 0] > 1 and category[ids[row, t], 0] == category[ids[row, -1], 0]:
                expected[row, actions[row, t]] += 1
    assert expected.sum() > 0
    model = PinFMForCTR(make_config(ctr_history_field_match_features=True, ctr_item_feature_fields=[1])).eval()
    model.set_item_features(torch.arange(VOCAB), category)
    got = model.history_counts(ids, actions, history, ids[:, -1], torch.arange(4), candidate_side_feature_ids=batch["side_feature_ids"])
    torch.testing.assert_close(got.expm1().round(), expected)
