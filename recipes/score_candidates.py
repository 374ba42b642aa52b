"""Score real candidates for a few users with a CTR use case (adapter on a base, from hub repo ids or folders).

    python recipes/score_candidates.py --base org/pinfm-ml1m --adapter org/pinfm-ml1m-like --use_case like
    python recipes/score_candidates.py --base outputs/ml1m_ctr_base/model --adapter outputs/ctr_ml1m_like/adapter

The last step of the README's life cycle. Candidates are the users' real impressions after the time cut (what they
rated next, unseen by training); each user's history is encoded once and every candidate cross-attends to it
(DCAT, `deduplicate_histories`). Prints each user's candidates ranked by predicted probability next to the real
label, and the AUC over all printed impressions.
"""

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from pinfm_hf import PinFMTokenizer
from pinfm_hf.data import (
    CTR_USE_CASES,
    CTRDataset,
    FEATURES_FILE_NAME,
    CTRFeatureEncoder,
    PinFMDataCollator,
    build_ctr_samples,
    EventSourceArguments,
    load_user_features_from_args,
    quantile_timestamp,
    split_ctr_samples,
)
from pinfm_hf.evaluate_metrics import load_ctr_metric
from pinfm_hf.hub import cached_file_from, check_model_reference
from pinfm_hf.training_utils import parse_recipe_args
from pinfm_hf.transfer import load_ctr_adapters


@dataclass
class ScoreArguments:
    base: str = field(metadata={"help": "Pretrained base: folder or hub repo id."})
    adapter: str = field(metadata={"help": "Use-case adapter from finetune_ctr.py --transfer lora: folder or hub repo id."})
    base_revision: Optional[str] = field(default=None, metadata={"help": "Branch, tag or commit of a hub --base."})
    adapter_revision: Optional[str] = field(default=None, metadata={"help": "Branch, tag or commit of a hub --adapter."})
    use_case: str = field(default="like", metadata={"help": f"One of {sorted(CTR_USE_CASES)}."})
    user_features: str = field(default="auto", metadata={"help": "As in finetune_ctr.py: 'auto', 'none' or a file."})
    cut_quantile: float = field(default=0.9, metadata={"help": "The time cut the adapter was trained before."})
    max_history: int = field(default=50, metadata={"help": "Most recent history events per impression (as trained)."})
    num_users: int = field(default=3, metadata={"help": "Score the first N users with impressions after the cut."})
    show: int = field(default=10, metadata={"help": "Print each user's N highest-scored candidates."})


def main(args: Optional[list[str]] = None) -> dict:
    args, data_args = parse_recipe_args((ScoreArguments, EventSourceArguments), args)
    if args.use_case not in CTR_USE_CASES:
        raise ValueError(f"Unknown --use_case {args.use_case!r}; choose one of {sorted(CTR_USE_CASES)}.")
    use_case = CTR_USE_CASES[args.use_case]
    check_model_reference(args.base, flag="--base")
    check_model_reference(args.adapter, flag="--adapter")

    # ----- model: the base loaded once, the use case's adapter on it -----
    model = load_ctr_adapters(
        args.base, {args.use_case: args.adapter}, revision=args.base_revision,
        adapter_revisions={args.use_case: args.adapter_revision},
    )
    tokenizer = PinFMTokenizer.from_pretrained(args.base, revision=args.base_revision)
    features = None
    if model.get_base_model().config.ctr_feature_vocab_size:
        features = CTRFeatureEncoder.load(cached_file_from(args.adapter, FEATURES_FILE_NAME, revision=args.adapter_revision))

    # ----- data: the users' real impressions after the cut, with their histories before each -----
    events = data_args.load_events()
    user_features = load_user_features_from_args(args.user_features, data_args.dataset, data_args.data_dir) if features else None
    sequences, samples = build_ctr_samples(
        events, positive_actions=list(use_case.positive_actions), negative_actions=list(use_case.negative_actions),
        user_features=user_features,
    )
    _, candidates = split_ctr_samples(samples, quantile_timestamp(events, args.cut_quantile))
    users = pc.unique(candidates["user_id"]).to_pylist()[: args.num_users]
    candidates = candidates.filter(pc.is_in(candidates["user_id"], value_set=pa.array(users, type=candidates["user_id"].type)))
    dataset = CTRDataset(sequences, candidates, tokenizer, max_history=args.max_history, feature_encoder=features)
    collate = PinFMDataCollator(pad_token_id=tokenizer.pad_token_id, padding_side="left", max_length=args.max_history + 1)
    batch = collate([dataset[i] for i in range(len(dataset))])
    labels = batch.pop("label")
    batch.pop("user_index")

    # ----- score: one history pass per request, every candidate cross-attends to it -----
    with torch.inference_mode():
        probabilities = model(**batch, deduplicate_histories=True).logits.sigmoid()
    rows = candidates.select(["user_id", "item_id", "timestamp"]).to_pylist()
    for user in users:
        ranked = sorted(
            ((p, int(y), row["item_id"]) for p, y, row in zip(probabilities.tolist(), labels.tolist(), rows) if row["user_id"] == user),
            reverse=True,
        )
        print(f"user {user}: {len(ranked)} candidates, the top {min(args.show, len(ranked))} by p({args.use_case}):")
        for p, y, item in ranked[: args.show]:
            print(f"  {p:.3f}  label {y}  {item}")
    if labels.unique().numel() < 2:
        print("All these impressions have the same label: no AUC.")
        return {"num_samples": len(rows)}
    metrics = load_ctr_metric(keep_in_memory=True).compute(
        predictions=probabilities.numpy(), references=labels.long().numpy(), user_ids=np.zeros(len(rows), dtype=np.int64)  # one pool
    )
    print(f"AUC over these {len(rows)} impressions: {metrics['auc']:.4f}")
    return metrics


if __name__ == "__main__":
    main()
