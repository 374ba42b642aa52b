import pyarrow as pa
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from pinfm_hf import PinFMConfig, PinFMForPretraining, PinFMTokenizer
from pinfm_hf.data.collator import PinFMDataCollator
from pinfm_hf.evaluation import evaluate_next_item
from pinfm_hf.metrics import rank_of_targets, retrieval_metrics, summarize


def test_next_item_evaluation_ranks_from_the_request_time():
    # The target's timestamp is the request time of the prediction (as in training, where position i sees the time
    # of event i + 1); the evaluator must pass it to the model, and rank over items only.
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
    model = PinFMForPretraining(config).eval()

    metrics = evaluate_next_item(model, loader, Accelerator(cpu=True), num_special_tokens=config.num_special_item_tokens,
                                 num_scored_ids=tokenizer.first_bucket_id, show_progress=False)

    ranks = []
    with torch.no_grad():
        for batch in loader:
            query = model(batch["input_ids"], batch["attention_mask"], batch["action_ids"], timestamps=batch["timestamps"],
                          end_timestamps=batch["target_timestamps"]).query_embeddings[:, -1]  # full rows: no padding
            scores = model.score_items(query)[:, : tokenizer.first_bucket_id]
            ranks.append(rank_of_targets(scores, batch["target_ids"], invalid_ids=list(range(config.num_special_item_tokens))))
    expected = summarize(retrieval_metrics(torch.cat(ranks)))
    assert metrics["num_users"] == users
    for name, value in expected.items():
        assert abs(metrics[name] - value) < 1e-6, name
