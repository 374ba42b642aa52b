import pyarrow as pa
import pytest
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from pinfm_hf import PinFMConfig, PinFMForPretraining, PinFMTokenizer
from pinfm_hf.data.collator import PinFMDataCollator
from pinfm_hf.evaluation import MISS_RANK, evaluate_next_item, history_ids, history_mask, rank_and_top_k
from pinfm_hf.metrics import rank_of_targets, retrieval_metrics, summarize


def tiny_model_and_loader():
    """A random tiny model and a loader of 24 users' held-out last events (9 events each, items from 30)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    users, length = 24, 9
    items = [[f"m{int(i)}" for i in torch.randint(0, 30, (length,), generator=g)] for _ in range(users)]
    times = [(1_000_000 + torch.randint(0, 10**6, (length,), generator=g).sort().values).tolist() for _ in range(users)]
    sequences = pa.table({"item_ids": items, "actions": [["click"] * length] * users, "timestamps": times})
    tokenizer = PinFMTokenizer.from_events(
        pa.table({"item_id": sum(items, []), "action": ["click"] * (users * length)}), num_hash_buckets=8
    )
    encoded = tokenizer.encode_sequences(sequences, max_length=8, hold_out_last=True).to_pylist()
    loader = DataLoader(encoded, batch_size=5, collate_fn=PinFMDataCollator())
    config = PinFMConfig(item_vocab_size=len(tokenizer), action_vocab_size=len(tokenizer.action_tokens), hidden_size=16,
                         num_hidden_layers=1, num_attention_heads=2, hidden_dropout_prob=0.0)
    return PinFMForPretraining(config).eval(), tokenizer, loader


def expected_metrics(model, tokenizer, loader, exclude_history: bool) -> dict[str, float]:
    """The evaluator's figures computed by hand: the last position's scores over items, ranked per row."""
    num_special, num_items = model.config.num_special_item_tokens, tokenizer.first_bucket_id
    ranks = []
    with torch.no_grad():
        for batch in loader:
            query = model(batch["input_ids"], batch["attention_mask"], batch["action_ids"], timestamps=batch["timestamps"],
                          end_timestamps=batch["target_timestamps"]).query_embeddings[:, -1]  # full rows: no padding
            scores = model.score_items(query)[:, :num_items]
            exclude = torch.zeros_like(scores, dtype=torch.bool)
            if exclude_history:
                for row, history in enumerate(batch["input_ids"].tolist()):
                    exclude[row, history] = True
            ranks.append(rank_of_targets(scores, batch["target_ids"], exclude_mask=exclude, invalid_ids=list(range(num_special))))
    return summarize(retrieval_metrics(torch.cat(ranks)))


def test_next_item_evaluation_ranks_from_the_request_time():
    # The target's timestamp is the request time of the prediction (as in training, where position i sees the time
    # of event i + 1); the evaluator must pass it to the model, and rank over items only.
    model, tokenizer, loader = tiny_model_and_loader()

    metrics = evaluate_next_item(model, loader, Accelerator(cpu=True), num_special_tokens=model.config.num_special_item_tokens,
                                 num_scored_ids=tokenizer.first_bucket_id, show_progress=False)

    expected = expected_metrics(model, tokenizer, loader, exclude_history=False)
    assert metrics["num_users"] == 24
    for name, value in expected.items():
        assert abs(metrics[name] - value) < 1e-6, name


def test_next_item_evaluation_can_mask_the_history_as_hstu_does():
    # HSTU's evaluation drops the items of the input events from the ranking (the target stays a candidate).
    model, tokenizer, loader = tiny_model_and_loader()
    kwargs = dict(num_special_tokens=model.config.num_special_item_tokens, num_scored_ids=tokenizer.first_bucket_id,
                  show_progress=False)

    masked = evaluate_next_item(model, loader, Accelerator(cpu=True), exclude_history=True, **kwargs)
    unmasked = evaluate_next_item(model, loader, Accelerator(cpu=True), **kwargs)

    expected = expected_metrics(model, tokenizer, loader, exclude_history=True)
    for name, value in expected.items():
        assert abs(masked[name] - value) < 1e-6, name
    assert masked["mrr"] > unmasked["mrr"]  # fewer competitors for every target


def test_targets_outside_the_vocabulary_are_misses():
    # A capped vocabulary (--max_vocab_size) hashes the tail's items into buckets: such a target cannot be recommended,
    # so it counts as a miss (rank behind every item), and the other users' figures are unchanged.
    model, tokenizer, loader = tiny_model_and_loader()
    kwargs = dict(num_special_tokens=model.config.num_special_item_tokens, num_scored_ids=tokenizer.first_bucket_id,
                  show_progress=False)
    def evaluate(batches):  # the evaluator pops the targets: fresh batches for every call
        return evaluate_next_item(model, batches, Accelerator(cpu=True), **kwargs)

    batches = list(loader)
    batches[0]["target_ids"][0] = tokenizer.first_bucket_id + 3  # user 0's target: an item hashed into a bucket
    first_user = {key: value[:1].clone() for key, value in batches[0].items()}
    capped, alone = evaluate(batches), evaluate([first_user])
    full = expected_metrics(model, tokenizer, loader, exclude_history=False)
    assert capped["num_users"] == 24 and alone["num_users"] == 1
    assert alone["hr@200"] == alone["ndcg@200"] == 0 and alone["mrr"] < 1e-9
    others = evaluate(list(loader))  # the same 24 users with user 0's true target
    for name in ("hr@10", "ndcg@10", "hr@200", "mrr"):
        assert others[name] == pytest.approx(full[name], abs=1e-6)
        assert capped[name] <= others[name] + 1e-9


def test_history_mask_marks_the_real_input_items_only():
    input_ids = torch.tensor([[5, 6, 0, 0], [7, 9, 12, 5]])
    attention_mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])

    mask = history_mask(input_ids, attention_mask, num_ids=10)

    assert mask.shape == (2, 10)
    assert mask[0].nonzero().flatten().tolist() == [5, 6]  # padding (id 0) is not history
    assert mask[1].nonzero().flatten().tolist() == [5, 7, 9]  # id 12 (>= num_ids, e.g. a hash bucket) is dropped


def test_a_model_with_nan_weights_is_refused_not_scored_as_perfect():
    # `score > NaN` is never true: before the check, a NaN model ranked every target first (HR@10 = NDCG@10 = 1).
    model, tokenizer, loader = tiny_model_and_loader()
    with torch.no_grad():
        model.next_item_head.query_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="24 of 24 evaluation users have non-finite .*no metric is reported"):
        evaluate_next_item(model, loader, Accelerator(cpu=True), num_special_tokens=model.config.num_special_item_tokens,
                           num_scored_ids=tokenizer.first_bucket_id, show_progress=False)


@pytest.mark.parametrize("exclude_history", [False, True])
def test_packed_evaluation_gives_the_padded_figures(exclude_history):
    model, tokenizer, _ = tiny_model_and_loader()
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(2, 10, (40,), generator=g).tolist()  # histories of different lengths: padding to save
    items = [[f"m{int(i)}" for i in torch.randint(0, 30, (n,), generator=g)] for n in lengths]
    times = [(1_000_000 + torch.randint(0, 10**6, (n,), generator=g).sort().values).tolist() for n in lengths]
    sequences = pa.table({"item_ids": items, "actions": [["click"] * n for n in lengths], "timestamps": times})
    encoded = tokenizer.encode_sequences(sequences, max_length=8, hold_out_last=True).to_pylist()
    figures = []
    for pack_length in (None, 16):
        loader = DataLoader(encoded, batch_size=7, collate_fn=PinFMDataCollator(pack_length=pack_length))
        figures.append(evaluate_next_item(
            model, loader, Accelerator(cpu=True), num_special_tokens=model.config.num_special_item_tokens,
            num_scored_ids=tokenizer.first_bucket_id, exclude_history=exclude_history, show_progress=False,
        ))
    padded, packed = figures
    assert packed["num_users"] == padded["num_users"] == 40
    assert next(iter(loader))["input_ids"].shape[0] < 7  # several users per packed row
    for name, value in padded.items():
        assert abs(packed[name] - value) < 1e-6, name


def dense_ranks(scores, targets, num_special, num_scored, exclude_ids):
    """The dense reference (the evaluator before chunking): `score_next_items`' masking, then `rank_of_targets`."""
    scores = scores.clone()
    scores[:, :num_special] = float("-inf")  # as score_items does for every special token
    scores = scores[:, :num_scored]
    exclude = torch.zeros_like(scores, dtype=torch.bool)
    for row, ids in enumerate(exclude_ids.tolist()):
        exclude[row, [i for i in ids if 0 <= i < num_scored]] = True
    unknown = targets >= num_scored
    ranks = rank_of_targets(scores, targets.masked_fill(unknown, num_special), exclude_mask=exclude,
                            invalid_ids=list(range(num_special)))
    return ranks.masked_fill(unknown, MISS_RANK)


def awkward_scores(seed=0, rows=40, num_special=4, num_scored=50, num_buckets=6):
    """Scores with many ties, NaNs and infinities, targets of every kind, histories holding some targets."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 6, (rows, num_scored + num_buckets), generator=g).float()  # few values: ties everywhere
    scores[torch.rand(scores.shape, generator=g) < 0.05] = float("nan")
    scores[torch.rand(scores.shape, generator=g) < 0.02] = float("inf")
    scores[torch.rand(scores.shape, generator=g) < 0.02] = float("-inf")
    targets = torch.randint(num_special, num_scored, (rows,), generator=g)
    targets[:3] = torch.tensor([num_scored, num_scored + 2, 1])  # two hash buckets, a special token
    scores[3:6, targets[3:6]] = float("nan")  # NaN targets
    history = torch.randint(0, num_scored + num_buckets, (rows, 9), generator=g)
    history[torch.rand(history.shape, generator=g) < 0.2] = -1  # padding
    history[6:12, 0] = targets[6:12]  # targets in the history stay candidates
    return scores, targets, history


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 46, 1000])
def test_chunked_ranks_equal_the_dense_ranks(chunk_size):
    # 46 items (ids 4..49): 3 and 7 do not divide it, 46 is one chunk, 1000 more than the catalogue.
    scores, targets, history = awkward_scores()
    called = []
    def score_ids(ids):
        called.append(ids)
        return scores[:, ids]

    for exclude in (None, history):
        got = rank_and_top_k(score_ids, targets, num_special_tokens=4, num_scored_ids=50, exclude_ids=exclude,
                             chunk_size=chunk_size)
        expected = dense_ranks(scores, targets, 4, 50, history if exclude is not None else torch.empty(40, 0).long())
        assert got.ranks.tolist() == expected.tolist()
    assert got.ranks[:2].tolist() == [MISS_RANK] * 2  # hash-bucket targets
    num_chunks = -(-46 // chunk_size)
    assert len(called) == 2 * (1 + num_chunks)  # per call: the targets, then the chunks
    assert max(len(ids) for ids in called[-num_chunks:]) <= chunk_size
    scored = torch.cat(called[-num_chunks:])  # every item once, nothing else
    assert scored.tolist() == list(range(4, 50))
    assert got.non_finite.tolist() == (~torch.isfinite(scores[:, 4:50])).any(dim=1).tolist()


def test_chunked_ranks_follow_the_nan_and_history_rules():
    # Hand-made rows against the dense reference, each rule on its own (ids 0-1 special, 2-7 items, 8-9 buckets).
    nan, inf = float("nan"), float("inf")
    scores = torch.tensor([
        [9.0, 9.0, 1.0, 5.0, 5.0, nan, 0.0, 2.0, 9.0, 9.0],  # target 3: tie (optimistic) and a NaN rival above
        [0.0, 0.0, 1.0, nan, 5.0, 4.0, 0.0, 2.0, 0.0, 0.0],  # NaN target 3: last, behind 5 finite rivals
        [0.0, 0.0, 1.0, 3.0, 5.0, 4.0, 6.0, 2.0, 0.0, 0.0],  # target 3 in the history, with 5 and 6
        [0.0, 0.0, 1.0, 3.0, 5.0, inf, 6.0, 2.0, 0.0, 0.0],  # target 9: a hash bucket
    ])
    targets = torch.tensor([3, 3, 3, 9])
    history = torch.tensor([[-1, -1], [-1, -1], [3, 6], [4, 8]])

    got = rank_and_top_k(lambda ids: scores[:, ids], targets, num_special_tokens=2, num_scored_ids=8, exclude_ids=history,
                         chunk_size=3)

    assert got.ranks.tolist() == [2, 6, 3, MISS_RANK]
    assert got.ranks.tolist() == dense_ranks(scores, targets, 2, 8, history).tolist()
    assert got.non_finite.tolist() == [True, True, False, True]


@pytest.mark.parametrize("chunk_size", [1, 3, 46])
def test_running_top_k_is_the_top_k_of_the_masked_scores(chunk_size):
    scores, targets, history = awkward_scores(seed=1)
    masked = scores[:, 4:50].clone()
    for row, ids in enumerate(history.tolist()):
        masked[row, [i - 4 for i in ids if 4 <= i < 50]] = float("-inf")
    for k in (1, 5, 46, 100):
        got = rank_and_top_k(lambda ids: scores[:, ids], targets, num_special_tokens=4, num_scored_ids=50,
                             exclude_ids=history, k=k, chunk_size=chunk_size)
        expected = masked.topk(min(k, 46), dim=1)
        torch.testing.assert_close(got.top_scores, expected.values, rtol=0, atol=0, equal_nan=True)
        # ties come in any order: each id must carry its score, and be listed once
        torch.testing.assert_close(masked.gather(1, got.top_ids - 4), got.top_scores, rtol=0, atol=0, equal_nan=True)
        assert all(len(set(row)) == len(row) for row in got.top_ids.tolist())

    distinct = torch.randn(40, 56, generator=torch.Generator().manual_seed(2))  # no ties: the ids are exactly topk's
    got = rank_and_top_k(lambda ids: distinct[:, ids], targets, num_special_tokens=4, num_scored_ids=50, k=10,
                         chunk_size=chunk_size)
    assert got.top_ids.tolist() == (distinct[:, 4:50].topk(10, dim=1).indices + 4).tolist()


def test_history_ids_hold_the_history_mask_sparsely():
    input_ids = torch.tensor([[5, 6, 0, 0], [7, 9, 12, 5]])
    attention_mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    assert history_ids(input_ids, attention_mask, num_ids=10).tolist() == [[5, 6, -1, -1], [7, 9, -1, 5]]
    # packed: row 0 holds sequences [5, 6] and [7]; row 1 holds [9, 12, 5]
    packed = history_ids(torch.tensor([[5, 6, 7, 0], [9, 12, 5, 0]]), torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]]), num_ids=10,
                         position_ids=torch.tensor([[0, 1, 0, 0], [0, 1, 2, 0]]))
    assert packed.tolist() == [[5, 6, -1], [7, -1, -1], [9, -1, 5]]


@pytest.mark.parametrize("exclude_history", [False, True])
def test_evaluation_scores_the_catalogue_in_chunks_with_the_dense_figures(exclude_history, monkeypatch):
    model, tokenizer, loader = tiny_model_and_loader()
    expected = expected_metrics(model, tokenizer, loader, exclude_history=exclude_history)
    widths = []
    score_items = model.score_items
    def spy(query, item_ids=None):
        assert item_ids is not None  # never the whole vocabulary at once
        widths.append(len(item_ids))
        return score_items(query, item_ids)
    monkeypatch.setattr(model, "score_items", spy)

    for chunk_size in (1, 7, 65_536):
        widths.clear()
        metrics = evaluate_next_item(
            model, loader, Accelerator(cpu=True), num_special_tokens=model.config.num_special_item_tokens,
            num_scored_ids=tokenizer.first_bucket_id, exclude_history=exclude_history, chunk_size=chunk_size,
            show_progress=False,
        )
        assert metrics["num_users"] == 24
        for name, value in expected.items():
            assert metrics[name] == value, (chunk_size, name)
        num_items = tokenizer.first_bucket_id - model.config.num_special_item_tokens
        chunk_widths = [w for i, w in enumerate(widths) if i % (1 + -(-num_items // chunk_size))]  # not the target calls
        assert max(chunk_widths) <= chunk_size and sum(chunk_widths) == 5 * num_items  # 5 batches, every item once


@pytest.mark.parametrize("exclude_history", [False, True])
def test_an_explicit_catalogue_ranks_only_its_ids(exclude_history):
    # A vocabulary-free model's ids are hashes: evaluation ranks the data's items (`candidate_ids`), not an id range.
    model, tokenizer, loader = tiny_model_and_loader()
    num_special, first_bucket = model.config.num_special_item_tokens, tokenizer.first_bucket_id
    kwargs = dict(num_special_tokens=num_special, num_scored_ids=first_bucket, exclude_history=exclude_history,
                  show_progress=False, chunk_size=5)
    everything = torch.arange(num_special, first_bucket)
    as_range = evaluate_next_item(model, loader, Accelerator(cpu=True), **kwargs)
    assert evaluate_next_item(model, loader, Accelerator(cpu=True), candidate_ids=everything, **kwargs) == as_range
    # Without one item: users whose target it is miss, and nobody else ranks worse.
    target = next(iter(loader))["target_ids"][0].item()
    fewer = evaluate_next_item(model, loader, Accelerator(cpu=True), candidate_ids=everything[everything != target], **kwargs)
    assert fewer["hr@200"] < as_range["hr@200"] and fewer["num_users"] == 24
