import pyarrow as pa
import pytest
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from pinfm_hf import PinFMConfig, PinFMForPretraining, PinFMTokenizer
from pinfm_hf.data.collator import PinFMDataCollator
from pinfm_hf.evaluation import evaluate_next_item, history_mask
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
