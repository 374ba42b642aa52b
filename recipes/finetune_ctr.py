"""Fine-tune a pretrained PinFM into a CTR/CVR ranker, with a GPSD transfer strategy or a LoRA adapter per use case.

    accelerate launch recipes/finetune_ctr.py --config recipes/configs/ml1m_like.yaml --base outputs/ml1m_ctr_base/model
    python recipes/finetune_ctr.py --config recipes/configs/ml1m_like.yaml --transfer lora   # single process

Samples come from real events only: each impression of the use case (e.g. ML-1M `like`: every rating, label =
rating >= 4) with the user's history strictly before it, split at one global time cut (train before, test after).
The base must have been pretrained on events before that cut (`pretrain.py --time_cut_quantile`, same value); the
recipe refuses a base whose recorded data reaches past it. `--transfer` picks the strategy (see `--help`); LoRA
saves a shareable adapter folder (adapter + head + card), the others a full model folder. Any config field can be
overridden on the command line; `--resume_from_checkpoint latest` continues an interrupted run exactly.
"""

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow.compute as pc
import torch
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

from pinfm_hf import PinFMTokenizer
from pinfm_hf.data import (
    CTR_USE_CASES,
    CTRDataset,
    CTRFeatureEncoder,
    CTRImpressionGroups,
    EventSourceArguments,
    PinFMDataCollator,
    collate_impression_groups,
    ctr_splits,
    load_user_features_from_args,
    randomize_candidate_ids,
    side_feature_fields,
    use_case_actions,
)
from pinfm_hf.checkpointing import LoopPosition, RunFolder
from pinfm_hf.evaluation import evaluate_ctr
from pinfm_hf.hub import HubArguments, is_local_folder
from pinfm_hf.io_utils import atomic_folder, atomic_write_json
from pinfm_hf.model_card import render_ctr_card
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
from pinfm_hf.transfer import (
    TRANSFER_STRATEGIES,
    build_ctr_model,
    count_parameters,
    ctr_config_from_base,
    optimizer_param_groups,
    save_ctr_adapter,
)


logger = get_logger("finetune_ctr")

@dataclass
class DataArguments(EventSourceArguments):
    use_case: str = field(
        default="like",
        metadata={"help": f"One of {sorted(CTR_USE_CASES)}, or 'custom' with --positive_actions/--negative_actions."},
    )
    positive_actions: Optional[str] = field(default=None, metadata={"help": "Custom use case: comma-separated actions labelled 1."})
    negative_actions: Optional[str] = field(default=None, metadata={"help": "Custom use case: comma-separated actions labelled 0."})
    user_features: str = field(
        default="auto",
        metadata={"help": "'auto' (ml-1m.user for ML-1M), 'none', or a CSV/Parquet file with user_id + feature columns."},
    )
    side_features: bool = field(default=True, metadata={"help": "Feed user and item side features to the head."})
    cut_quantile: float = field(default=0.9, metadata={"help": "Global time cut (quantile of event times): train before, test after."})
    max_history: int = field(default=50, metadata={"help": "Most recent history events before each impression."})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Train on a seeded random subset of N samples."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Test on a seeded random subset of N samples."})
    max_slots_per_field: int = field(default=8, metadata={"help": "Most values kept per multi-valued side feature."})

    def __post_init__(self):
        check_ranges(
            self, positive=("max_history", "max_train_samples", "max_eval_samples", "max_slots_per_field"),
            quantiles=("cut_quantile",),
        )


@dataclass
class ModelArguments:
    base: str = field(
        default="outputs/ml1m_ctr_base/model",
        metadata={"help": "Pretrained folder or hub repo id (its tokenizer and architecture are used for every strategy)."},
    )
    base_revision: Optional[str] = field(default=None, metadata={"help": "Branch, tag or commit of a hub --base."})
    transfer: str = field(
        default="full", metadata={"help": "; ".join(f"'{k}': {v}" for k, v in TRANSFER_STRATEGIES.items())}
    )
    ctr_fusion: str = field(default="early", metadata={"help": "'early' (candidate token) or 'late' (user + candidate embedding)."})
    ctr_head: str = field(default="mlp", metadata={"help": "'mlp' or 'dcn' (cross layers before the MLP)."})
    ctr_head_hidden_sizes: list[int] = field(default_factory=lambda: [64, 32])
    ctr_num_cross_layers: int = 2
    ctr_dropout: float = 0.1
    ctr_feature_embedding_size: int = 16
    ctr_aux_loss_weight: float = field(default=0.0, metadata={"help": "Weight of the auxiliary next-token loss on histories."})
    ctr_candidate_item_features: bool = field(
        default=False, metadata={"help": "Cold start: the candidate's item features (genre, category) enter its token."}
    )
    ctr_young_item_dropout: float = field(
        default=0.0, metadata={"help": "Cold start: drop the sequence output of brand-new candidate items with this rate."}
    )
    ctr_young_item_age_days: float = field(default=7.0, metadata={"help": "Age at which the young-item dropout is off."})
    lora_rank: int = 4
    lora_alpha: int = 8
    lora_dropout: float = 0.0
    allow_leaky_base: bool = field(
        default=False, metadata={"help": "Accept a base pretrained on events after the cut (its figures then leak)."}
    )

    def __post_init__(self):
        check_ranges(
            self,
            positive=("ctr_head_hidden_sizes", "ctr_num_cross_layers", "ctr_feature_embedding_size", "ctr_young_item_age_days",
                      "lora_rank", "lora_alpha"),
            non_negative=("ctr_aux_loss_weight",),
            fractions=("ctr_dropout", "ctr_young_item_dropout", "lora_dropout"),
        )


@dataclass
class TrainArguments:
    output_dir: str = field(default="outputs/finetune_ctr", metadata={"help": "Run folder: model/ or adapter/, checkpoints/, logs."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Delete the outputs another run left in --output_dir instead of refusing it."}
    )
    seed: int = 42
    per_device_train_batch_size: int = 256
    per_device_eval_batch_size: int = 1024
    learning_rate: float = field(default=1e-3, metadata={"help": "Learning rate of new parts: head, random layers, LoRA."})
    backbone_learning_rate: float = field(default=1e-4, metadata={"help": "Learning rate of trainable pretrained weights."})
    weight_decay: float = 0.0
    warmup_steps: int = 50
    num_train_epochs: int = 1
    max_steps: int = field(default=-1, metadata={"help": "Stop after this many optimizer steps (-1: epochs decide)."})
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    mixed_precision: str = field(default="auto", metadata={"help": "'auto' (bf16 on GPU, none on CPU), 'no', 'bf16', 'fp16'."})
    logging_steps: int = 10
    checkpointing_steps: int = field(default=500, metadata={"help": "Save a resumable checkpoint every N steps."})
    checkpoints_total_limit: int = 2
    resume_from_checkpoint: Optional[str] = field(default=None, metadata={"help": "'latest' or a checkpoint folder."})
    stop_after_steps: Optional[int] = field(
        default=None, metadata={"help": "Save a checkpoint and exit after N steps, as if interrupted (tests)."}
    )
    report_to: Optional[str] = field(default=None, metadata={"help": "An Accelerate tracker, e.g. 'tensorboard'."})
    candidate_id_randomization: float = field(
        default=0.0, metadata={"help": "Cold start: share of training candidates whose id becomes a random hash bucket."}
    )
    deduplicate_histories: bool = field(
        default=False,
        metadata={"help": "DCAT: batch impressions of one request together and encode their shared history once "
                  "(same logits; fewer encoder passes). Batches then hold whole requests, about the same number of samples."},
    )

    def __post_init__(self):
        check_ranges(
            self,
            positive=("per_device_train_batch_size", "per_device_eval_batch_size", "learning_rate", "backbone_learning_rate",
                      "num_train_epochs", "gradient_accumulation_steps", "logging_steps", "checkpointing_steps",
                      "stop_after_steps"),
            non_negative=("seed", "weight_decay", "warmup_steps", "max_grad_norm", "checkpoints_total_limit"),
            fractions=("candidate_id_randomization",),
        )
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"--max_steps must be -1 (the epochs decide) or >= 1, got {self.max_steps}.")


def use_case_actions_from_args(data_args: DataArguments) -> tuple[list[str], list[str]]:
    def names(value: Optional[str]) -> list[str]:
        return [a.strip() for a in (value or "").split(",") if a.strip()]

    return use_case_actions(data_args.use_case, data_args.dataset, names(data_args.positive_actions), names(data_args.negative_actions))


def main(args: Optional[list[str]] = None) -> dict:
    data_args, model_args, train_args, hub_args = parse_recipe_args(
        (DataArguments, ModelArguments, TrainArguments, HubArguments), args
    )
    if hub_args.push_to_hub and model_args.transfer == "lora" and is_local_folder(model_args.base):
        raise ValueError(
            f"--push_to_hub of a LoRA adapter needs --base to be a hub repo id: the adapter names its base, and the "
            f"local folder {model_args.base!r} means nothing to others. Push the base first, then fine-tune from its id."
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

    # ----- data: events -> per-user sequences + impressions -> time split -> CTR samples -----
    positive_actions, negative_actions = use_case_actions_from_args(data_args)
    events = data_args.load_events()
    data = ctr_splits(
        events, positive_actions=positive_actions, negative_actions=negative_actions, cut_quantile=data_args.cut_quantile,
        user_features=load_user_features_from_args(data_args.user_features, data_args.dataset, data_args.data_dir)
        if data_args.side_features else None,
        max_train_samples=data_args.max_train_samples, max_test_samples=data_args.max_eval_samples, seed=train_args.seed,
    )
    cut, train_samples, test_samples = data.cut, data.train, data.test
    tokenizer = PinFMTokenizer.from_pretrained(model_args.base, revision=model_args.base_revision)
    feature_fields = side_feature_fields(train_samples) if data_args.side_features else []
    encoder = None
    if feature_fields:
        encoder = CTRFeatureEncoder.fit(train_samples, feature_fields, max_slots_per_field=data_args.max_slots_per_field)
    train_data = CTRDataset(data.sequences, train_samples, tokenizer, max_history=data_args.max_history, feature_encoder=encoder)
    test_data = CTRDataset(data.sequences, test_samples, tokenizer, max_history=data_args.max_history, feature_encoder=encoder)
    data_summary = {
        "use_case": data_args.use_case,
        "positive_actions": positive_actions,
        "negative_actions": negative_actions,
        "cut_timestamp": cut,
        "train_samples": train_samples.num_rows,
        "test_samples": test_samples.num_rows,
        "train_positive_rate": round(float(np.mean(train_samples["label"].to_numpy())), 4),
        "test_positive_rate": round(float(np.mean(test_samples["label"].to_numpy())), 4),
        "side_features": feature_fields,
        "test_fresh_samples": int(pc.sum(pc.greater_equal(test_samples["item_first_seen"], cut)).as_py() or 0),
    }
    logger.info("CTR data: %s", data_summary)
    collator = PinFMDataCollator(
        pad_token_id=tokenizer.pad_token_id, padding_side="left", max_length=data_args.max_history + 1
    )
    if train_args.deduplicate_histories:
        # Shuffle whole requests, so DCAT finds each shared history within its batch; same samples per batch on average.
        groups = CTRImpressionGroups(train_data)
        group_batch = max(1, round(train_args.per_device_train_batch_size / groups.mean_group_size))
        logger.info("DCAT: %d requests of %.2f impressions on average; %d requests per batch.", len(groups), groups.mean_group_size, group_batch)
        train_loader = DataLoader(groups, batch_size=group_batch, shuffle=True, collate_fn=collate_impression_groups(collator))
    else:
        train_loader = DataLoader(train_data, batch_size=train_args.per_device_train_batch_size, shuffle=True, collate_fn=collator)
    test_loader = DataLoader(test_data, batch_size=train_args.per_device_eval_batch_size, collate_fn=collator)

    # ----- model: base architecture + CTR head, with the chosen transfer strategy -----
    config = ctr_config_from_base(
        model_args.base,
        revision=model_args.base_revision,
        ctr_fusion=model_args.ctr_fusion,
        ctr_head=model_args.ctr_head,
        ctr_head_hidden_sizes=model_args.ctr_head_hidden_sizes,
        ctr_num_cross_layers=model_args.ctr_num_cross_layers,
        ctr_dropout=model_args.ctr_dropout,
        ctr_feature_vocab_size=encoder.vocab_size if encoder else 0,
        ctr_feature_slots=encoder.slots if encoder else None,
        ctr_feature_embedding_size=model_args.ctr_feature_embedding_size,
        ctr_aux_loss_weight=model_args.ctr_aux_loss_weight,
        ctr_candidate_item_features=model_args.ctr_candidate_item_features,
        ctr_item_feature_fields=[i for i, f in enumerate(feature_fields) if f in events.item_features] or None,
        ctr_young_item_dropout=model_args.ctr_young_item_dropout,
        ctr_young_item_age_days=model_args.ctr_young_item_age_days,
    )
    seen_until = config.pretraining_max_timestamp
    if seen_until is None:
        logger.warning("%s does not record its pretraining data window: make sure it saw no event after %d.", model_args.base, cut)
    elif seen_until >= cut and not model_args.allow_leaky_base:
        raise ValueError(
            f"{model_args.base} was pretrained on events up to {seen_until}, at or after the CTR cut {cut}: test "
            f"impressions leaked into pretraining. Pretrain with `--time_cut_quantile {data_args.cut_quantile}`, or "
            "pass --allow_leaky_base to accept it knowingly."
        )
    built = build_ctr_model(
        model_args.base, model_args.transfer, config,
        lora_rank=model_args.lora_rank, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
        revision=model_args.base_revision,
    )
    model = built.model
    trainable_params, model_params = count_parameters(model)
    optimizer = torch.optim.AdamW(
        optimizer_param_groups(
            built, learning_rate=train_args.learning_rate, backbone_learning_rate=train_args.backbone_learning_rate,
            weight_decay=train_args.weight_decay,
        ),
        lr=train_args.learning_rate,
    )
    model, optimizer, train_loader, test_loader = accelerator.prepare(model, optimizer, train_loader, test_loader)
    scheduler, steps_per_epoch, total_steps, num_epochs = cosine_schedule(
        optimizer, accelerator, num_batches=len(train_loader), gradient_accumulation_steps=train_args.gradient_accumulation_steps,
        num_train_epochs=train_args.num_train_epochs, max_steps=train_args.max_steps, warmup_steps=train_args.warmup_steps,
    )
    logger.info(
        "Transfer %r: %s trainable parameters (%.2f%% of %s); %d steps (%d epochs of %d).",
        model_args.transfer, f"{trainable_params:,}", 100 * trainable_params / model_params, f"{model_params:,}",
        total_steps, num_epochs, steps_per_epoch,
    )

    # ----- resume -----
    run_log = JsonlLogger(output_dir / "train_log.jsonl", enabled=accelerator.is_main_process)
    position = run.resume(accelerator, model, train_args.resume_from_checkpoint) or LoopPosition()
    run_log.restart(position.step)
    if train_args.report_to:
        accelerator.init_trackers("pinfm-finetune-ctr", config={**asdict(data_args), **asdict(model_args), **asdict(train_args)})

    # ----- loop -----
    loop = TrainingLoop(
        accelerator, model, scheduler, run, position, total_steps=total_steps, num_epochs=num_epochs,
        seed=train_args.seed, max_grad_norm=train_args.max_grad_norm, checkpointing_steps=train_args.checkpointing_steps,
        checkpoints_total_limit=train_args.checkpoints_total_limit, stop_after_steps=train_args.stop_after_steps,
        run_log=run_log, logging_steps=train_args.logging_steps, unit="samples", description=f"finetune {model_args.transfer}",
    )
    model.train()
    for epoch in loop.epochs():
        for batch in loop.batches(train_loader, epoch):
            labels = batch.pop("label")
            batch.pop("user_index")
            batch["input_ids"] = randomize_candidate_ids(
                batch["input_ids"], batch["attention_mask"], fraction=train_args.candidate_id_randomization,
                first_bucket_id=tokenizer.first_bucket_id, num_buckets=len(tokenizer) - tokenizer.first_bucket_id,
            )
            with accelerator.accumulate(model):
                outputs = model(**batch, labels=labels, deduplicate_histories=train_args.deduplicate_histories)
                accelerator.backward(outputs.loss)
                record = loop.after_backward(outputs, units=labels.numel())
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if record is not None:
                loop.after_step(record)
    train_seconds = loop.finish()
    if loop.interrupted:
        logger.info("Stopped after step %d as asked (--stop_after_steps); resume with --resume_from_checkpoint latest.", loop.step)
        finish(accelerator)
        run.release()
        return {"step": loop.step, "interrupted": True}

    # ----- evaluation and save -----
    test_metrics = evaluate_ctr(
        model, test_loader, accelerator, deduplicate_histories=train_args.deduplicate_histories, fresh_after=cut
    )
    run_log.log({"step": loop.step, **{f"test/{k}": v for k, v in test_metrics.items()}})
    logger.info("Test at step %d: %s", loop.step, {k: round(v, 4) for k, v in test_metrics.items()})
    results = {
        "dataset": data_args.dataset,
        "base": model_args.base,
        "transfer": model_args.transfer,
        "data": data_summary,
        "steps": loop.step,
        "epochs": num_epochs,
        "train_seconds": round(train_seconds, 1),
        "seconds_per_epoch": round(train_seconds / max(loop.step / steps_per_epoch, 1e-9), 1),
        "total_seconds": round(time.time() - start_time, 1),
        "trainable_parameters": trainable_params,
        "model_parameters": model_params,
        "peak_rss_gib": round(peak_rss_gib(), 3),
        "num_processes": accelerator.num_processes,
        "parameter_checksums": parameter_checksums(model, accelerator),
        "test": test_metrics,
    }
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        is_adapter = model_args.transfer == "lora"
        save_dir = output_dir / ("adapter" if is_adapter else "model")
        atomic_write_json(output_dir / "results.json", results)
        plot = plot_training_curves(output_dir / "train_log.jsonl", output_dir / "training_curves.png")
        with atomic_folder(save_dir) as folder:
            if is_adapter:
                save_ctr_adapter(unwrapped, folder, base=model_args.base, base_revision=model_args.base_revision)
            else:
                unwrapped.save_pretrained(folder)
                tokenizer.save_pretrained(folder)
            if encoder is not None:
                encoder.save(folder)
            card = render_ctr_card(
                save_dir=save_dir, results=results, data_args=asdict(data_args), model_args=asdict(model_args),
                train_args=asdict(train_args), repo_id=hub_args.hub_model_id,
            )
            (folder / "README.md").write_text(card)
        logger.info("Saved %s to %s, curves to %s, results to %s.", save_dir.name, save_dir, plot, output_dir / "results.json")
        if hub_args.push_to_hub:
            url = hub_args.push(save_dir, [output_dir / "results.json", output_dir / "train_log.jsonl", plot])
            logger.info("Pushed %s (%s, card, training metrics) to %s", save_dir, save_dir.name, url)
    finish(accelerator)
    run.release()
    return results


if __name__ == "__main__":
    main()
