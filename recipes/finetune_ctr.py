"""Fine-tune a pretrained PinFM into a CTR/CVR ranker, with a GPSD transfer strategy or a LoRA adapter per use case.

    accelerate launch recipes/finetune_ctr.py --config recipes/configs/ml1m_like.yaml --base outputs/ml1m_ctr_base/model
    python recipes/finetune_ctr.py --config recipes/configs/ml1m_like.yaml --transfer lora   # single process

Samples come from real events only: each impression of the use case (e.g. ML-1M `like`: every rating, label =
rating >= 4) with the user's history strictly before it, split at one global time cut (train before, test after).
The base must have been pretrained on events before that cut (`pretrain.py --time_cut_quantile`, same value); the
recipe refuses a base whose recorded data reaches past it. With `--validation_cut_quantile`, the impressions between
that cut and the test cut are a validation slice: `--eval_every_epochs 1 --load_best_model_at_end true
--early_stopping_patience 1` trains until validation AUC stops rising and tests the best epoch. `--transfer` picks the strategy (see `--help`); LoRA
saves a shareable adapter folder (adapter + head + card), the others a full model folder. Any config field can be
overridden on the command line; `--resume_from_checkpoint latest` continues an interrupted run exactly.
"""

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow.compute as pc
import torch
from accelerate.logging import get_logger
from safetensors.torch import load_model, save_model
from torch.utils.data import DataLoader

from pinfm_hf import PinFMTokenizer, PretrainingObjective
from pinfm_hf.arguments import CTR_MODEL_FIELDS, CTRDataArguments, CTRModelArguments, CTRTrainingArguments
from pinfm_hf.data import (
    CTRDataset,
    CTRFeatureEncoder,
    CTRImpressionGroups,
    EventTable,
    PinFMDataCollator,
    collate_impression_groups,
    item_feature_table,
    side_feature_fields,
)
from pinfm_hf.evaluation import evaluate_ctr
from pinfm_hf.hub import HubArguments, check_model_reference, is_local_folder
from pinfm_hf.model_card import render_ctr_card
from pinfm_hf.modeling_pinfm_ctr import randomize_candidate_ids
from pinfm_hf.training_loop import TrainingLoop, start_run
from pinfm_hf.training_utils import cosine_schedule, parameter_checksums, parse_recipe_args, peak_rss_gib
from pinfm_hf.transfer import (
    build_ctr_model,
    count_parameters,
    ctr_config_from_base,
    optimizer_param_groups,
    save_ctr_adapter,
)


logger = get_logger("finetune_ctr")
BEST_WEIGHTS = "model.safetensors"  # <output_dir>/best_model/: every weight of the best validation (LoRA or not)


@dataclass
class CTRData:
    events: EventTable
    tokenizer: PinFMTokenizer
    cut: int
    feature_fields: list[str]
    encoder: Optional[CTRFeatureEncoder]
    summary: dict
    train_loader: DataLoader
    valid_loader: Optional[DataLoader]
    test_loader: DataLoader


def load_data(data_args: CTRDataArguments, model_args: CTRModelArguments, train_args: CTRTrainingArguments) -> CTRData:
    """Events -> per-user sequences + impressions -> time split (train, validation, test) -> CTR samples -> loaders."""
    positive_actions, negative_actions = data_args.actions()
    events, data = data_args.load_splits(train_args.seed)
    tokenizer = PinFMTokenizer.from_pretrained(model_args.base, revision=model_args.base_revision)
    feature_fields = side_feature_fields(data.train) if data_args.side_features else []
    encoder = None
    if feature_fields:
        encoder = CTRFeatureEncoder.fit(data.train, feature_fields, max_slots_per_field=data_args.max_slots_per_field)
    train_data, valid_data, test_data = (
        CTRDataset(data.sequences, samples, tokenizer, max_history=data_args.max_history, feature_encoder=encoder)
        if samples is not None else None
        for samples in (data.train, data.valid, data.test)
    )
    summary = {
        "use_case": data_args.use_case,
        "positive_actions": positive_actions,
        "negative_actions": negative_actions,
        "cut_timestamp": data.cut,
        "validation_cut_timestamp": data.validation_cut,
        "train_samples": data.train.num_rows,
        "validation_samples": data.valid.num_rows if data.valid is not None else 0,
        "test_samples": data.test.num_rows,
        "train_positive_rate": round(float(np.mean(data.train["label"].to_numpy())), 4),
        "test_positive_rate": round(float(np.mean(data.test["label"].to_numpy())), 4),
        "side_features": feature_fields,
        "test_fresh_samples": int(pc.sum(pc.greater_equal(data.test["item_first_seen"], data.cut)).as_py() or 0),
    }
    logger.info("CTR data: %s", summary)
    collator = PinFMDataCollator(pad_token_id=tokenizer.pad_token_id, padding_side="left", max_length=data_args.max_history + 1)
    if train_args.deduplicate_histories:
        # Shuffle whole requests, so DCAT finds each shared history within its batch; same samples per batch on average.
        groups = CTRImpressionGroups(train_data)
        group_batch = max(1, round(train_args.per_device_train_batch_size / groups.mean_group_size))
        logger.info("DCAT: %d requests of %.2f impressions on average; %d requests per batch.", len(groups), groups.mean_group_size, group_batch)
        train_loader = DataLoader(groups, batch_size=group_batch, shuffle=True, collate_fn=collate_impression_groups(collator))
    else:
        train_loader = DataLoader(train_data, batch_size=train_args.per_device_train_batch_size, shuffle=True, collate_fn=collator)
    valid_loader, test_loader = (
        DataLoader(part, batch_size=train_args.per_device_eval_batch_size, collate_fn=collator) if part is not None else None
        for part in (valid_data, test_data)
    )
    return CTRData(events, tokenizer, data.cut, feature_fields, encoder, summary, train_loader, valid_loader, test_loader)


def build_model(data: CTRData, data_args: CTRDataArguments, model_args: CTRModelArguments, objective: PretrainingObjective):
    """The base's architecture with the ranking head, built with the transfer strategy; refuses a base that saw the test period."""
    config = ctr_config_from_base(
        model_args.base,
        revision=model_args.base_revision,
        **{name: getattr(model_args, name) for name in CTR_MODEL_FIELDS},
        ctr_feature_vocab_size=data.encoder.vocab_size if data.encoder else 0,
        ctr_feature_slots=data.encoder.slots if data.encoder else None,
        ctr_item_feature_fields=[i for i, f in enumerate(data.feature_fields) if f in data.events.item_features] or None,
    )
    seen_until = config.pretraining_max_timestamp
    if seen_until is None:
        logger.warning("%s does not record its pretraining data window: make sure it saw no event after %d.", model_args.base, data.cut)
    elif seen_until >= data.cut and not model_args.allow_leaky_base:
        raise ValueError(
            f"{model_args.base} was pretrained on events up to {seen_until}, at or after the CTR cut {data.cut}: test "
            f"impressions leaked into pretraining. Pretrain with `--time_cut_quantile {data_args.cut_quantile}`, or "
            "pass --allow_leaky_base to accept it knowingly."
        )
    item_features = None
    if config.ctr_history_field_match_features:
        item_fields = [data.feature_fields[i] for i in config.ctr_item_feature_fields]
        item_features = item_feature_table(data.events, data.tokenizer, data.encoder, item_fields)
        logger.info("Item fields %s recorded for %d items (history matches by field).", item_fields, len(item_features[0]))
    return build_ctr_model(
        model_args.base, model_args.transfer, config, objective=objective,
        lora_rank=model_args.lora_rank, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
        lora_use_dora=model_args.lora_use_dora, lora_item_embeddings_rank=model_args.lora_item_embeddings_rank,
        item_features=item_features,
        revision=model_args.base_revision,
    )


def main(args: Optional[list[str]] = None) -> dict:
    data_args, model_args, objective, train_args, hub_args = parse_recipe_args(
        (CTRDataArguments, CTRModelArguments, PretrainingObjective, CTRTrainingArguments, HubArguments), args
    )
    check_model_reference(model_args.base, flag="--base")
    if hub_args.push_to_hub and model_args.transfer == "lora" and is_local_folder(model_args.base):
        raise ValueError(
            f"--push_to_hub of a LoRA adapter needs --base to be a hub repo id: the adapter names its base, and the "
            f"local folder {model_args.base!r} means nothing to others. Push the base first, then fine-tune from its id."
        )
    accelerator, run = start_run(train_args, hub_args)  # fails before any data is read on a bad folder or hub token
    start_time = time.time()

    # ----- data and model (base architecture + CTR head, with the chosen transfer strategy) -----
    data = load_data(data_args, model_args, train_args)
    tokenizer = data.tokenizer
    built = build_model(data, data_args, model_args, objective)
    model = built.model
    trainable_params, model_params = count_parameters(model)
    optimizer = torch.optim.AdamW(
        optimizer_param_groups(
            built, learning_rate=train_args.learning_rate, backbone_learning_rate=train_args.backbone_learning_rate,
            weight_decay=train_args.weight_decay,
        ),
        lr=train_args.learning_rate,
    )
    if train_args.eval_every_epochs and data.valid_loader is None:
        raise ValueError("--eval_every_epochs validates on the slice before the test cut: set --validation_cut_quantile.")
    model, optimizer, train_loader, test_loader = accelerator.prepare(model, optimizer, data.train_loader, data.test_loader)
    valid_loader = accelerator.prepare(data.valid_loader) if data.valid_loader is not None else None
    scheduler, steps_per_epoch, total_steps, num_epochs = cosine_schedule(
        optimizer, accelerator, num_batches=len(train_loader), gradient_accumulation_steps=train_args.gradient_accumulation_steps,
        num_train_epochs=train_args.num_train_epochs, max_steps=train_args.max_steps, warmup_steps=train_args.warmup_steps,
    )
    logger.info(
        "Transfer %r: %s trainable parameters (%.2f%% of %s); %d steps (%d epochs of %d).",
        model_args.transfer, f"{trainable_params:,}", 100 * trainable_params / model_params, f"{model_params:,}",
        total_steps, num_epochs, steps_per_epoch,
    )

    # ----- resume, then loop -----
    loop = TrainingLoop(
        accelerator, model, scheduler, run, train_args, total_steps=total_steps, num_epochs=num_epochs, unit="samples",
        description=f"finetune {model_args.transfer}",
    )
    loop.init_trackers("pinfm-finetune-ctr", data_args, model_args, objective, train_args)
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
        if loop.interrupted:
            break
        if train_args.eval_every_epochs and (epoch + 1) % train_args.eval_every_epochs == 0:
            with loop.paused():  # validation is not training time
                valid_metrics = evaluate_ctr(model, valid_loader, accelerator, deduplicate_histories=train_args.deduplicate_histories)
                loop.log({"step": loop.step, "epoch": epoch + 1, **{f"valid/{k}": v for k, v in valid_metrics.items()}})
                logger.info("Validation after epoch %d: %s", epoch + 1, {k: round(v, 4) for k, v in valid_metrics.items()})
                if train_args.load_best_model_at_end:
                    loop.after_validation(valid_metrics["auc"], lambda folder: save_model(accelerator.unwrap_model(model), folder / BEST_WEIGHTS))
    train_seconds = loop.finish()
    if loop.interrupted:
        loop.close()
        return {"step": loop.step, "interrupted": True}

    # ----- evaluation (of the best validation's weights, when asked) and save -----
    best_step = None
    if train_args.load_best_model_at_end:
        best_step = loop.load_best_model(accelerator.unwrap_model(model), lambda m, folder: load_model(m, folder / BEST_WEIGHTS))
    test_metrics = evaluate_ctr(
        model, test_loader, accelerator, deduplicate_histories=train_args.deduplicate_histories, fresh_after=data.cut
    )
    loop.log({"step": loop.step, **{f"test/{k}": v for k, v in test_metrics.items()}})
    logger.info("Test at step %d: %s", loop.step, {k: round(v, 4) for k, v in test_metrics.items()})
    results = {
        "dataset": data_args.dataset,
        "base": model_args.base,
        "transfer": model_args.transfer,
        "data": data.summary,
        "steps": loop.step,
        "epochs": num_epochs,
        "epochs_trained": round(loop.step / steps_per_epoch, 2),
        "best_step": best_step,  # the tested and saved weights: the best validation AUC's (None: the last step's)
        "best_epoch": round(best_step / steps_per_epoch, 2) if best_step is not None else None,
        "best_valid_auc": loop.position.best_metric if best_step is not None else None,
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
    unwrapped = accelerator.unwrap_model(model)
    is_adapter = model_args.transfer == "lora"
    save_dir = run.output_dir / ("adapter" if is_adapter else "model")

    def fill(folder: Path) -> None:
        if is_adapter:
            save_ctr_adapter(unwrapped, folder, base=model_args.base, base_revision=model_args.base_revision)
        else:
            unwrapped.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
        if data.encoder is not None:
            data.encoder.save(folder)
        card = render_ctr_card(
            save_dir=save_dir, results=results, data_args=data_args, model_args=model_args, repo_id=hub_args.hub_model_id,
            comparison=json.loads(Path(train_args.card_comparison).read_text()) if train_args.card_comparison else None,
            comparison_source=train_args.card_comparison,
        )
        (folder / "README.md").write_text(card)

    loop.save(results, save_dir, fill, hub_args)
    loop.close()
    return results


if __name__ == "__main__":
    main()
