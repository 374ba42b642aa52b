"""Pretrain a PinFM foundation model on user activity sequences.

    accelerate launch recipes/pretrain.py --config recipes/configs/ml1m_pinfm_small.yaml
    python recipes/pretrain.py --config recipes/configs/ml1m_pinfm_small.yaml --num_train_epochs 2   # single process

Any config field can be overridden on the command line; `--help` lists them. Reads events through the data pipeline
(events -> per-user sequences -> leave-last-out splits), builds the tokenizer, trains with AdamW, warm-up + cosine,
gradient accumulation and clipping, evaluates full-ranking HR/NDCG/MRR (HSTU protocol), and saves a folder that
`AutoModel`/`AutoTokenizer.from_pretrained` load (also with `trust_remote_code=True` where pinfm_hf is absent),
with a model card, a JSONL log and a PNG of the training curves. `--resume_from_checkpoint latest` continues an
interrupted run exactly.
"""

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Union

import datasets
import numpy as np
import pyarrow.compute as pc
import torch
from accelerate.logging import get_logger
from torch.utils.data import DataLoader

from pinfm_hf import PinFMConfig, PinFMForPretraining, PinFMTokenizer, PretrainingObjective
from pinfm_hf.arguments import ModelArguments, PretrainingArguments, PretrainingDataArguments
from pinfm_hf.data import (
    EpochRandomSampler,
    EventTable,
    LengthGroupedEpochSampler,
    PinFMDataCollator,
    PreparedEvents,
    StreamingBatches,
    StreamingDataLoader,
    TokenBudgetBatchSampler,
    build_user_sequences,
    leave_last_out_split,
    next_item_eval_dataset,
    time_split,
)
from pinfm_hf.evaluation import evaluate_next_item
from pinfm_hf.hub import HubArguments
from pinfm_hf.model_card import render_pretrained_card
from pinfm_hf.optimization import build_optimizers
from pinfm_hf.training_loop import TrainingLoop, start_run
from pinfm_hf.training_utils import cosine_schedule, parameter_checksums, parse_recipe_args, peak_rss_gib


logger = get_logger("pretrain")


@dataclass
class PretrainingData:
    events: Union[EventTable, PreparedEvents]
    tokenizer: PinFMTokenizer
    positive_actions: Optional[list[str]]  # None: every event is a target
    train_loader: DataLoader  # a StreamingDataLoader for --prepared: each process reads its own shards
    valid_loader: DataLoader
    test_loader: DataLoader
    batch_tokens: Optional[int]  # events per batch (None: padded batches of a fixed number of users)
    train_rows: int
    mean_train_events: float  # per training row, after max_length
    train_item_counts: np.ndarray  # events of each token id in the training rows (popularity for the loss)
    catalogue_ids: Optional[torch.LongTensor]  # the ids evaluation ranks (None: the vocabulary's items)


def load_data(data_args: PretrainingDataArguments, train_args: PretrainingArguments, accelerator) -> PretrainingData:
    """Events -> per-user sequences -> leave-last-out splits -> the tokenizer -> tokens -> loaders."""
    # Vocabulary-free: no item kept, every id hashed into the buckets.
    vocabulary = dict(min_count=data_args.min_item_count, max_vocab_size=0 if data_args.vocabulary_free else data_args.max_vocab_size,
                      num_hash_buckets=data_args.num_hash_buckets, model_max_length=data_args.max_length)
    if data_args.prepared:  # a log prepared out of core (prepare_events.py): encoded into shards once, then streamed
        events = PreparedEvents.load(data_args.prepared)
        tokenizer = events.tokenizer(**vocabulary)
        with accelerator.main_process_first():  # the main process writes the encoded files, the others read them
            encoded = events.encoded_splits(
                tokenizer, train_holdout=data_args.train_holdout, max_length=data_args.max_length,
                windows=data_args.train_windows, max_train_users=data_args.max_train_users,
                max_eval_users=data_args.max_eval_users,
            )
        train_shards, train_item_counts = encoded.train, encoded.train_item_counts
        train_rows, train_events = train_shards.num_rows, train_shards.num_tokens
        evaluation = {"valid": encoded.valid, "test": encoded.test}
    else:
        events = data_args.load_events()
        if data_args.time_cut_quantile is not None:
            events, _, cut = time_split(events, quantile=data_args.time_cut_quantile)
            logger.info("Pretraining on events before %d (quantile %s) only.", cut, data_args.time_cut_quantile)
        splits = leave_last_out_split(build_user_sequences(events), train_holdout=data_args.train_holdout)
        if data_args.max_train_users is not None:
            splits["train"] = splits["train"].select(range(min(data_args.max_train_users, len(splits["train"]))))
        tokenizer = PinFMTokenizer.from_events(events, **vocabulary)
        train_table = tokenizer.encode_sequences(splits["train"], windows=data_args.train_windows)
        train_dataset, train_item_counts = datasets.Dataset(train_table), tokenizer.item_counts(train_table)
        lengths = pc.list_value_length(train_table.column("input_ids")).to_numpy()  # each row within max_length
        train_rows, train_events = len(lengths), int(lengths.sum())
        evaluation = {
            name: next_item_eval_dataset(splits[name], tokenizer, max_length=data_args.max_length, max_users=data_args.max_eval_users)
            for name in ("valid", "test")
        }
    catalogue_ids = None  # evaluation ranks the vocabulary's items; without one, the token ids of the data's items
    if data_args.vocabulary_free:
        items = events.item_counts()["item_id"] if data_args.prepared else pc.unique(events.table["item_id"])
        catalogue_ids = torch.from_numpy(np.unique(tokenizer.item_ids_to_token_ids(items)))
        logger.info("Vocabulary-free: %d items hash to %d distinct ids of %d.", len(items), len(catalogue_ids), data_args.num_hash_buckets)
    logger.info("Events: %s", events.describe())
    logger.info("Train rows %d, valid users %d, test users %d.", train_rows, len(evaluation["valid"]), len(evaluation["test"]))
    exclude = data_args.resolve_eval_exclude_history(events.repeat_share())
    logger.info("Evaluation ranks %s.", "items outside each user's history" if exclude else "every item")

    positives = data_args.positive_action_names(tokenizer.action_tokens[2:])
    pack_length = data_args.max_length if train_args.packing else None
    collator = PinFMDataCollator(
        pad_token_id=tokenizer.pad_token_id, max_length=data_args.max_length, return_labels=True,
        positive_action_ids=tokenizer.convert_actions_to_ids(positives) if positives else None, pack_length=pack_length,
        pack_first_fit=True,  # training rows only: the order of sequences within a batch does not matter to the losses
    )
    # Random users, about as many events per step as padded batches of per_device_train_batch_size users hold.
    max_tokens = train_args.per_device_train_batch_tokens or max(1, round(train_args.per_device_train_batch_size * train_events / train_rows))
    if data_args.prepared:
        batches = StreamingBatches(
            train_shards, max_tokens, seed=train_args.seed, buffer_size=data_args.shuffle_buffer_size,
            num_processes=accelerator.num_processes, process_index=accelerator.process_index,
            multiple_of=train_args.gradient_accumulation_steps,
        )
        train_loader = StreamingDataLoader(batches, collate_fn=collator)
    elif train_args.packing:
        batches = TokenBudgetBatchSampler(
            EpochRandomSampler(train_rows, seed=train_args.seed), lengths, max_tokens, num_processes=accelerator.num_processes
        )
        train_loader = DataLoader(train_dataset, batch_sampler=batches, collate_fn=collator)
    else:
        max_tokens, sampler = None, None
        if train_args.group_by_length:
            sampler = LengthGroupedEpochSampler(lengths.tolist(), train_args.per_device_train_batch_size, seed=train_args.seed)
        train_loader = DataLoader(
            train_dataset, batch_size=train_args.per_device_train_batch_size, shuffle=sampler is None, sampler=sampler,
            collate_fn=collator,
        )
    eval_collator = PinFMDataCollator(pad_token_id=tokenizer.pad_token_id, max_length=data_args.max_length, pack_length=pack_length)
    valid_loader, test_loader = (
        DataLoader(evaluation[name], batch_size=train_args.per_device_eval_batch_size, collate_fn=eval_collator)
        for name in ("valid", "test")
    )
    return PretrainingData(
        events, tokenizer, positives, train_loader, valid_loader, test_loader, max_tokens, train_rows,
        train_events / train_rows, train_item_counts, catalogue_ids,
    )


def build_model(
    data: PretrainingData, data_args: PretrainingDataArguments, model_args: ModelArguments, objective: PretrainingObjective,
    train_args: PretrainingArguments,
) -> PinFMForPretraining:
    """The architecture of `model_args` sized to the data's vocabularies, trained on `objective`."""
    tokenizer = data.tokenizer
    if objective.full_softmax == "auto":
        full = objective.resolve_full_softmax(len(tokenizer), train_args.full_softmax_max_items)
        logger.info("--full_softmax auto: %s over %s item ids.", "every item" if full else "sampled negatives", f"{len(tokenizer):,}")
    if objective.full_softmax and len(tokenizer) > train_args.full_softmax_max_items:
        raise ValueError(
            f"--full_softmax scores all {len(tokenizer):,} item ids at every position, more than "
            f"--full_softmax_max_items ({train_args.full_softmax_max_items:,}): use sampled negatives "
            "(--full_softmax false --num_negatives 1024) or raise the limit if memory allows."
        )
    if objective.contrastive_loss_weight > 0 and not (model_args.hidden_dropout_prob > 0 or model_args.attention_dropout > 0):
        raise ValueError(
            "--contrastive_loss_weight compares two dropout passes: set --hidden_dropout_prob or --attention_dropout > 0."
        )
    config = PinFMConfig(
        item_vocab_size=len(tokenizer),
        action_vocab_size=tokenizer.action_vocab_size,
        surface_vocab_size=tokenizer.surface_vocab_size,
        max_position_embeddings=data_args.max_length + 1,
        pretraining_max_timestamp=data.events.max_timestamp,
        **asdict(model_args),
    )
    model = PinFMForPretraining(config)
    model.objective = objective
    model.next_item_head.init_temperature(objective.initial_temperature)
    model.set_item_counts(torch.from_numpy(data.train_item_counts))
    if train_args.gradient_checkpointing:
        model.activation_checkpointing_enable()
    return model


def main(args: Optional[list[str]] = None) -> dict:
    data_args, model_args, objective, train_args, hub_args = parse_recipe_args(
        (PretrainingDataArguments, ModelArguments, PretrainingObjective, PretrainingArguments, HubArguments), args
    )
    accelerator, run = start_run(train_args, hub_args)  # fails before any data is read on a bad folder or hub token
    start_time = time.time()

    # ----- data and model -----
    data = load_data(data_args, train_args, accelerator)
    model = build_model(data, data_args, model_args, objective, train_args)
    optimizers = build_optimizers(
        model, learning_rate=train_args.learning_rate, weight_decay=train_args.weight_decay, adam_beta2=train_args.adam_beta2,
        item_optimizer=train_args.item_optimizer, item_learning_rate=train_args.item_learning_rate,
    )
    model, valid_loader, test_loader, *optimizers = accelerator.prepare(model, data.valid_loader, data.test_loader, *optimizers)
    streaming = isinstance(data.train_loader, StreamingDataLoader)  # each process already reads its own shards
    train_loader = data.train_loader if streaming else accelerator.prepare(data.train_loader)
    schedules = [
        cosine_schedule(
            optimizer, accelerator, num_batches=len(train_loader), gradient_accumulation_steps=train_args.gradient_accumulation_steps,
            num_train_epochs=train_args.num_train_epochs, max_steps=train_args.max_steps, warmup_steps=train_args.warmup_steps,
        )
        for optimizer in optimizers
    ]
    schedulers = [schedule[0] for schedule in schedules]
    _, steps_per_epoch, total_steps, num_epochs = schedules[0]
    num_params = sum(p.numel() for p in model.parameters())
    logger.info("Model: %.2fM parameters; %d steps (%d epochs of %d).", num_params / 1e6, total_steps, num_epochs, steps_per_epoch)

    # ----- resume, then loop -----
    loop = TrainingLoop(
        accelerator, model, schedulers[0], run, train_args, total_steps=total_steps, num_epochs=num_epochs, unit="tokens",
        description="pretrain",
    )
    loop.init_trackers("pinfm-pretrain", data_args, model_args, objective, train_args)
    # With train_holdout 1 the validation targets are training targets: say so wherever those figures appear.
    valid_name = "valid" if data_args.train_holdout >= 2 else "valid_in_sample"
    if train_args.load_best_model_at_end and valid_name == "valid_in_sample":
        raise ValueError("--load_best_model_at_end chooses the epoch on validation: it needs --train_holdout 2 (with 1 "
                         "the validation targets are trained on).")
    if train_args.eval_every_epochs and valid_name == "valid_in_sample":
        logger.warning("--train_holdout 1 trains on the validation targets: periodic figures are logged as "
                       "'valid_in_sample'; use --train_holdout 2 to validate out of sample.")

    def log_eval(name: str, loader) -> dict:
        metrics = evaluate_next_item(
            model, loader, accelerator, num_special_tokens=model_config.num_special_item_tokens,
            num_scored_ids=data.tokenizer.first_bucket_id, exclude_history=data_args.eval_exclude_history,
            candidate_ids=data.catalogue_ids,
        )
        loop.log({"step": loop.step, **{f"{name}/{k}": v for k, v in metrics.items()}})
        logger.info("%s at step %d: %s", name, loop.step, {k: round(v, 4) for k, v in metrics.items()})
        return metrics

    model_config = accelerator.unwrap_model(model).config
    model.train()
    for epoch in loop.epochs():
        for batch in loop.batches(train_loader, epoch):
            with accelerator.accumulate(model):
                outputs = model(**batch)
                accelerator.backward(outputs.loss)
                record = loop.after_backward(outputs, units=int(batch["attention_mask"].sum()))
                for optimizer, scheduler in zip(optimizers, schedulers):
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
            if record is not None:
                loop.after_step(record, temperature=accelerator.unwrap_model(model).temperature.item())
        if loop.interrupted:
            break
        if train_args.eval_every_epochs and (epoch + 1) % train_args.eval_every_epochs == 0:
            with loop.paused():  # validation is not training time
                metrics = log_eval(valid_name, valid_loader)
                if train_args.load_best_model_at_end:
                    loop.after_validation(metrics["ndcg@10"], accelerator.unwrap_model(model).save_pretrained)
    train_seconds = loop.finish()
    if loop.interrupted:
        loop.close()
        return {"step": loop.step, "interrupted": True}

    # ----- final evaluation and save -----
    best_step = loop.load_best_model(accelerator.unwrap_model(model)) if train_args.load_best_model_at_end else None
    results = {
        "dataset": data_args.prepared or data_args.dataset,
        "steps": loop.step,
        "epochs": round(loop.step / steps_per_epoch, 2),
        "train_seconds": round(train_seconds, 1),
        "tokens_per_s": round(loop.units_seen / max(train_seconds, 1e-9), 1),
        "peak_rss_gib": round(peak_rss_gib(), 3),
        "num_parameters": num_params,
        "num_processes": accelerator.num_processes,
        "parameter_checksums": parameter_checksums(model, accelerator),
        "train_holdout": data_args.train_holdout,
        "packing": train_args.packing,
        "item_optimizer": train_args.item_optimizer,
        "streaming": streaming,
        "per_device_train_batch_tokens": data.batch_tokens,
        "train_rows": data.train_rows,
        "mean_train_events": round(data.mean_train_events, 2),
        "periodic_validation": valid_name if train_args.eval_every_epochs else None,
        "best_step": best_step,  # the tested and saved weights: the best validation's (None: the last step's)
        "best_valid_ndcg@10": loop.position.best_metric if best_step is not None else None,
        "eval_exclude_history": data_args.eval_exclude_history,
        "test": log_eval("test", test_loader),
    }
    results["total_seconds"] = round(time.time() - start_time, 1)
    unwrapped = accelerator.unwrap_model(model)

    def fill(folder: Path) -> None:
        unwrapped.save_pretrained(folder)
        data.tokenizer.save_pretrained(folder)
        card = render_pretrained_card(
            model_dir=run.output_dir / "model", config=unwrapped.config, objective=objective,
            positive_actions=data.positive_actions, results=results, data_args=data_args,
            events_summary=data.events.summary(), repo_id=hub_args.hub_model_id,
        )
        (folder / "README.md").write_text(card)

    loop.save(results, run.output_dir / "model", fill, hub_args)
    loop.close()
    return results


if __name__ == "__main__":
    main()
