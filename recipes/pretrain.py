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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import datasets
import pyarrow.compute as pc
import torch
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

from pinfm_hf import PinFMConfig, PinFMForPretraining, PinFMTokenizer
from pinfm_hf.data import (
    DEFAULT_POSITIVE_ACTIONS,
    LengthGroupedEpochSampler,
    PinFMDataCollator,
    build_user_sequences,
    leave_last_out_split,
    next_item_eval_dataset,
    EventSourceArguments,
    time_split,
)
from pinfm_hf.checkpointing import LoopPosition, RunFolder
from pinfm_hf.evaluation import evaluate_next_item
from pinfm_hf.hub import HubArguments
from pinfm_hf.io_utils import atomic_folder, atomic_write_json
from pinfm_hf.model_card import render_pretrained_card
from pinfm_hf.training_loop import TrainingLoop
from pinfm_hf.training_utils import (
    JsonlLogger,
    check_ranges,
    configure_recipe_logging,
    cosine_schedule,
    finish,
    make_accelerator,
    parse_recipe_args,
    parameter_checksums,
    peak_rss_gib,
    plot_training_curves,
)


logger = get_logger("pretrain")


@dataclass
class DataArguments(EventSourceArguments):
    max_length: int = field(default=200, metadata={"help": "Most recent events per user the model sees."})
    min_item_count: int = field(default=1, metadata={"help": "Items seen fewer times go to hash buckets."})
    max_vocab_size: Optional[int] = field(default=None, metadata={"help": "Keep only the most frequent items."})
    num_hash_buckets: int = field(default=1024, metadata={"help": "Buckets for item ids unseen at tokenizer build."})
    positive_actions: str = field(
        default="all", metadata={"help": "Comma-separated positive action names, 'all', or 'default' (per data set)."}
    )
    time_cut_quantile: Optional[float] = field(
        default=None,
        metadata={"help": "Pretrain only on events before this global time quantile (e.g. 0.9), so that a CTR test "
                  "period after it (finetune_ctr.py --cut_quantile, same value) never leaks into pretraining."},
    )
    train_windows: bool = field(default=True, metadata={"help": "Train on every max_length chunk of long histories."})
    train_holdout: int = field(
        default=1,
        metadata={"help": "Events held out of training at the end of each sequence: 1 trains on the validation targets "
                  "(HSTU's protocol, so periodic validation is in-sample); 2 keeps them out (out-of-sample validation)."},
    )
    max_eval_users: Optional[int] = field(default=None, metadata={"help": "Evaluate on the first N users only."})
    eval_exclude_history: bool = field(
        default=False,
        metadata={"help": "Do not rank the items of the user's input events (HSTU's protocol; data without repeats)."},
    )
    max_train_users: Optional[int] = field(default=None, metadata={"help": "Train on the first N users only (tests)."})

    def __post_init__(self):
        check_ranges(
            self, positive=("max_length", "min_item_count", "max_vocab_size", "train_holdout", "max_eval_users", "max_train_users"),
            non_negative=("num_hash_buckets",), quantiles=("time_cut_quantile",),
        )


@dataclass
class ModelArguments:
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    intermediate_size: Optional[int] = None
    hidden_dropout_prob: float = 0.2
    attention_dropout: float = 0.0
    use_action_embeddings: bool = True
    use_time_features: bool = True
    use_input_mlp: bool = True
    use_absolute_position_embeddings: bool = False
    num_item_hash_tables: int = 0
    item_hash_table_size: int = 100003
    next_token_loss_weight: float = 1.0
    multi_token_loss_weight: float = 0.0
    future_token_loss_weight: float = 0.0
    multi_token_window: int = 8
    future_token_input_length: int = 16
    num_negatives: int = 512
    negative_sampling: str = "uniform"
    use_in_batch_negatives: bool = True
    use_log_q_correction: bool = True
    full_softmax: bool = False
    initial_temperature: float = 0.05

    def __post_init__(self):
        check_ranges(
            self,
            positive=("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "item_hash_table_size",
                      "multi_token_window", "future_token_input_length", "num_negatives", "initial_temperature"),
            non_negative=("num_item_hash_tables", "next_token_loss_weight", "multi_token_loss_weight", "future_token_loss_weight"),
            fractions=("hidden_dropout_prob", "attention_dropout"),
        )


@dataclass
class TrainArguments:
    output_dir: str = field(default="outputs/pretrain", metadata={"help": "Run folder: model/, checkpoints/, logs."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Delete the outputs another run left in --output_dir instead of refusing it."}
    )
    seed: int = 42
    per_device_train_batch_size: int = 128
    per_device_eval_batch_size: int = 256
    group_by_length: bool = field(
        default=False,
        metadata={"help": "Batch sequences of similar length together: less padding, 1.27x tokens/s on ML-1M, but lower "
                  "quality after equal epochs (benchmarks/RESULTS.md)."},
    )
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    adam_beta2: float = 0.98
    warmup_steps: int = 100
    num_train_epochs: int = 20
    max_steps: int = field(default=-1, metadata={"help": "Stop after this many optimizer steps (-1: epochs decide)."})
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    mixed_precision: str = field(default="auto", metadata={"help": "'auto' (bf16 on GPU, none on CPU), 'no', 'bf16', 'fp16'."})
    gradient_checkpointing: bool = False
    logging_steps: int = 10
    eval_every_epochs: int = field(default=0, metadata={"help": "Validate every N epochs (0: only the final test)."})
    checkpointing_steps: int = field(default=500, metadata={"help": "Save a resumable checkpoint every N steps."})
    checkpoints_total_limit: int = 2
    resume_from_checkpoint: Optional[str] = field(default=None, metadata={"help": "'latest' or a checkpoint folder."})
    stop_after_steps: Optional[int] = field(
        default=None, metadata={"help": "Save a checkpoint and exit after N steps, as if interrupted (tests)."}
    )
    report_to: Optional[str] = field(default=None, metadata={"help": "An Accelerate tracker, e.g. 'tensorboard'."})
    full_softmax_max_items: int = field(
        default=100_000,
        metadata={"help": "Refuse --full_softmax above this many item ids: it scores every id at every position "
                  "(batch tokens x ids floats, several times over), which runs out of memory on large catalogues."},
    )

    def __post_init__(self):
        check_ranges(
            self,
            positive=("per_device_train_batch_size", "per_device_eval_batch_size", "learning_rate", "num_train_epochs",
                      "gradient_accumulation_steps", "logging_steps", "checkpointing_steps", "stop_after_steps",
                      "full_softmax_max_items"),
            non_negative=("seed", "weight_decay", "warmup_steps", "max_grad_norm", "eval_every_epochs",
                          "checkpoints_total_limit"),
            fractions=("adam_beta2",),
        )
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"--max_steps must be -1 (the epochs decide) or >= 1, got {self.max_steps}.")


def positive_action_names(data_args: DataArguments, tokenizer: PinFMTokenizer) -> Optional[list[str]]:
    if data_args.positive_actions == "all":
        return None
    if data_args.positive_actions == "default":
        if data_args.dataset not in DEFAULT_POSITIVE_ACTIONS:
            raise ValueError(f"No default positive actions for {data_args.dataset!r}; name them with --positive_actions.")
        return list(DEFAULT_POSITIVE_ACTIONS[data_args.dataset])
    names = [a.strip() for a in data_args.positive_actions.split(",") if a.strip()]
    tokenizer.convert_actions_to_ids(names)  # unknown names fail here, naming the action
    return names


def main(args: Optional[list[str]] = None) -> dict:
    data_args, model_args, train_args, hub_args = parse_recipe_args(
        (DataArguments, ModelArguments, TrainArguments, HubArguments), args
    )
    output_dir = Path(train_args.output_dir)
    accelerator = make_accelerator(
        output_dir,
        mixed_precision=train_args.mixed_precision,
        gradient_accumulation_steps=train_args.gradient_accumulation_steps,
        report_to=train_args.report_to,
    )
    configure_recipe_logging(accelerator.is_main_process)
    # Fail in a second, before any data is read: a busy or foreign run folder, a hub push that cannot succeed.
    run = RunFolder(output_dir, is_main_process=accelerator.is_main_process)
    run.claim(resume_from_checkpoint=train_args.resume_from_checkpoint, overwrite_output_dir=train_args.overwrite_output_dir)
    hub_args.check_access()
    set_seed(train_args.seed)
    start_time = time.time()

    # ----- data: events -> per-user sequences -> leave-last-out splits -> tokens -----
    events = data_args.load_events()
    if data_args.time_cut_quantile is not None:
        events, _, cut = time_split(events, quantile=data_args.time_cut_quantile)
        logger.info("Pretraining on events before %d (quantile %s) only.", cut, data_args.time_cut_quantile)
    logger.info("Events: %s", events.describe())
    splits = leave_last_out_split(build_user_sequences(events), train_holdout=data_args.train_holdout)
    if data_args.max_train_users is not None:
        splits["train"] = splits["train"].select(range(min(data_args.max_train_users, len(splits["train"]))))
    tokenizer = PinFMTokenizer.from_events(
        events,
        min_count=data_args.min_item_count,
        max_vocab_size=data_args.max_vocab_size,
        num_hash_buckets=data_args.num_hash_buckets,
        model_max_length=data_args.max_length,
    )
    train_table = tokenizer.encode_sequences(splits["train"], windows=data_args.train_windows)
    train_data = datasets.Dataset(train_table)
    valid_data = next_item_eval_dataset(splits["valid"], tokenizer, max_length=data_args.max_length, max_users=data_args.max_eval_users)
    test_data = next_item_eval_dataset(splits["test"], tokenizer, max_length=data_args.max_length, max_users=data_args.max_eval_users)
    logger.info("Train rows %d, valid users %d, test users %d.", len(train_data), len(valid_data), len(test_data))

    collator = PinFMDataCollator(pad_token_id=tokenizer.pad_token_id, max_length=data_args.max_length, return_labels=True)
    eval_collator = PinFMDataCollator(pad_token_id=tokenizer.pad_token_id, max_length=data_args.max_length)
    sampler = None
    if train_args.group_by_length:
        lengths = pc.list_value_length(train_table.column("input_ids")).to_pylist()
        sampler = LengthGroupedEpochSampler(lengths, train_args.per_device_train_batch_size, seed=train_args.seed)
    train_loader = DataLoader(
        train_data, batch_size=train_args.per_device_train_batch_size, shuffle=sampler is None, sampler=sampler,
        collate_fn=collator,
    )
    valid_loader = DataLoader(valid_data, batch_size=train_args.per_device_eval_batch_size, collate_fn=eval_collator)
    test_loader = DataLoader(test_data, batch_size=train_args.per_device_eval_batch_size, collate_fn=eval_collator)

    # ----- model -----
    if model_args.full_softmax and len(tokenizer) > train_args.full_softmax_max_items:
        raise ValueError(
            f"--full_softmax scores all {len(tokenizer):,} item ids at every position, more than "
            f"--full_softmax_max_items ({train_args.full_softmax_max_items:,}): use sampled negatives "
            "(--full_softmax false --num_negatives 1024) or raise the limit if memory allows."
        )
    positives = positive_action_names(data_args, tokenizer)
    config = PinFMConfig(
        item_vocab_size=len(tokenizer),
        action_vocab_size=tokenizer.action_vocab_size,
        surface_vocab_size=tokenizer.surface_vocab_size,
        max_position_embeddings=data_args.max_length + 1,
        positive_action_ids=tokenizer.convert_actions_to_ids(positives) if positives else None,
        pretraining_max_timestamp=int(pc.max(events.table["timestamp"]).as_py()),
        **asdict(model_args),
    )
    model = PinFMForPretraining(config)
    model.set_item_counts(torch.from_numpy(tokenizer.item_counts(train_table)))
    if train_args.gradient_checkpointing:
        model.activation_checkpointing_enable()
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "norm" in n]
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": train_args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=train_args.learning_rate,
        betas=(0.9, train_args.adam_beta2),
    )
    model, optimizer, train_loader, valid_loader, test_loader = accelerator.prepare(
        model, optimizer, train_loader, valid_loader, test_loader
    )
    scheduler, steps_per_epoch, total_steps, num_epochs = cosine_schedule(
        optimizer, accelerator, num_batches=len(train_loader), gradient_accumulation_steps=train_args.gradient_accumulation_steps,
        num_train_epochs=train_args.num_train_epochs, max_steps=train_args.max_steps, warmup_steps=train_args.warmup_steps,
    )
    num_params = sum(p.numel() for p in model.parameters())
    logger.info("Model: %.2fM parameters; %d steps (%d epochs of %d).", num_params / 1e6, total_steps, num_epochs, steps_per_epoch)

    # ----- resume -----
    run_log = JsonlLogger(output_dir / "train_log.jsonl", enabled=accelerator.is_main_process)
    position = run.resume(accelerator, model, train_args.resume_from_checkpoint) or LoopPosition()
    run_log.restart(position.step)
    if train_args.report_to:
        accelerator.init_trackers("pinfm-pretrain", config={**asdict(data_args), **asdict(model_args), **asdict(train_args)})

    # ----- loop -----
    # With train_holdout 1 the validation targets are training targets: say so wherever those figures appear.
    valid_name = "valid" if data_args.train_holdout >= 2 else "valid_in_sample"
    if train_args.eval_every_epochs and valid_name == "valid_in_sample":
        logger.warning("--train_holdout 1 trains on the validation targets: periodic figures are logged as "
                       "'valid_in_sample'; use --train_holdout 2 to validate out of sample.")

    def log_eval(name: str, loader) -> dict:
        metrics = evaluate_next_item(
            model, loader, accelerator, num_special_tokens=config.num_special_item_tokens,
            num_scored_ids=tokenizer.first_bucket_id, exclude_history=data_args.eval_exclude_history,
        )
        record = {"step": loop.step, **{f"{name}/{k}": v for k, v in metrics.items()}}
        run_log.log(record)
        accelerator.log(record, step=loop.step)
        logger.info("%s at step %d: %s", name, loop.step, {k: round(v, 4) for k, v in metrics.items()})
        return metrics

    loop = TrainingLoop(
        accelerator, model, scheduler, run, position, total_steps=total_steps, num_epochs=num_epochs,
        seed=train_args.seed, max_grad_norm=train_args.max_grad_norm, checkpointing_steps=train_args.checkpointing_steps,
        checkpoints_total_limit=train_args.checkpoints_total_limit, stop_after_steps=train_args.stop_after_steps,
        run_log=run_log, logging_steps=train_args.logging_steps, unit="tokens", description="pretrain",
    )
    model.train()
    for epoch in loop.epochs():
        for batch in loop.batches(train_loader, epoch):
            with accelerator.accumulate(model):
                outputs = model(**batch)
                accelerator.backward(outputs.loss)
                record = loop.after_backward(outputs, units=int(batch["attention_mask"].sum()))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if record is not None:
                loop.after_step(record, temperature=accelerator.unwrap_model(model).temperature.item())
        if loop.interrupted:
            break
        if train_args.eval_every_epochs and (epoch + 1) % train_args.eval_every_epochs == 0:
            log_eval(valid_name, valid_loader)
    train_seconds = loop.finish()
    if loop.interrupted:
        logger.info("Stopped after step %d as asked (--stop_after_steps); resume with --resume_from_checkpoint latest.", loop.step)
        finish(accelerator)
        run.release()
        return {"step": loop.step, "interrupted": True}

    # ----- final evaluation and save -----
    test_metrics = log_eval("test", test_loader)
    results = {
        "dataset": data_args.dataset,
        "steps": loop.step,
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.time() - start_time, 1),
        "tokens_per_s": round(loop.units_seen / max(train_seconds, 1e-9), 1),
        "peak_rss_gib": round(peak_rss_gib(), 3),
        "num_parameters": num_params,
        "num_processes": accelerator.num_processes,
        "parameter_checksums": parameter_checksums(model, accelerator),
        "train_holdout": data_args.train_holdout,
        "periodic_validation": valid_name if train_args.eval_every_epochs else None,
        "eval_exclude_history": data_args.eval_exclude_history,
        "test": test_metrics,
    }
    if accelerator.is_main_process:
        model_dir = output_dir / "model"
        unwrapped = accelerator.unwrap_model(model)
        atomic_write_json(output_dir / "results.json", results)
        plot = plot_training_curves(output_dir / "train_log.jsonl", output_dir / "training_curves.png")
        with atomic_folder(model_dir) as folder:
            unwrapped.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            card = render_pretrained_card(
                model_dir=model_dir, config=unwrapped.config, results=results, data_args=asdict(data_args),
                train_args=asdict(train_args), events_summary=events.summary(), repo_id=hub_args.hub_model_id,
            )
            (folder / "README.md").write_text(card)
        logger.info("Saved model + tokenizer + card to %s, curves to %s, results to %s.", model_dir, plot, output_dir / "results.json")
        if hub_args.push_to_hub:
            url = hub_args.push(model_dir, [output_dir / "results.json", output_dir / "train_log.jsonl", plot])
            logger.info("Pushed %s (model, tokenizer, code, card, training metrics) to %s", model_dir, url)
    finish(accelerator)
    run.release()
    return results


if __name__ == "__main__":
    main()
