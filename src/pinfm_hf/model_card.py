"""Model cards rendered from real run outputs (Jinja templates shipped in `model_card_templates/` + `huggingface_hub` card data)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from huggingface_hub import EvalResult, ModelCard, ModelCardData


if TYPE_CHECKING:
    from .arguments import CTRDataArguments, PretrainingDataArguments
    from .configuration_pinfm import PinFMConfig
    from .losses import PretrainingObjective


TEMPLATE_DIR = Path(__file__).resolve().parent / "model_card_templates"  # package data: installed wheels have it
# Config fields worth showing on a card (the full config is in config.json), then the objective that trained it.
CARD_CONFIG_FIELDS = (
    "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "max_position_embeddings",
    "item_vocab_size", "action_vocab_size", "use_action_embeddings", "use_time_features", "use_absolute_position_embeddings",
    "num_item_hash_tables",
)
CARD_OBJECTIVE_FIELDS = (
    "next_token_loss_weight", "multi_token_loss_weight", "future_token_loss_weight", "contrastive_loss_weight",
    "num_negatives", "negative_sampling", "full_softmax",
)
DATASET_IDS = {"ml-1m": "movielens-1m", "taobao": "taobao-user-behavior"}


def _template(template_path: Optional[str | Path], name: str) -> Path:
    path = Path(template_path or TEMPLATE_DIR / name)
    if not path.is_file():
        raise FileNotFoundError(f"Model card template {path} not found.")
    return path


def _eval_results(task_type: str, dataset: str, metrics: dict[str, float]) -> list[EvalResult]:
    """The card's model-index entries: one per measured metric."""
    dataset_type = DATASET_IDS.get(dataset, Path(dataset).stem)
    return [
        EvalResult(task_type=task_type, dataset_type=dataset_type, dataset_name=dataset, metric_type=name,
                   metric_value=round(float(value), 4))
        for name, value in metrics.items()
    ]


def _holdout_sentence(results: dict[str, Any]) -> str:
    """How the evaluated events were kept out of training (`--train_holdout`) and how the weights were chosen."""
    if results.get("train_holdout", 1) >= 2:
        text = ("Trained on all but each user's last two events (validation on the second-to-last, test on the last, "
                "the validation event in the test input)")
    else:
        text = "Trained on all but each user's last event (HSTU's protocol; no held-out validation)"
    if results.get("best_step") is not None:
        text += f"; weights of the best validation NDCG@10 (step {results['best_step']}) tested"
    return text + "."


def render_pretrained_card(
    *,
    model_dir: str | Path,
    config: PinFMConfig,
    objective: PretrainingObjective,
    positive_actions: Optional[list[str]],
    results: dict[str, Any],
    data_args: PretrainingDataArguments,
    events_summary: dict[str, Any],
    repo_id: Optional[str] = None,
    template_path: Optional[str | Path] = None,
) -> str:
    """
    Fill the pretrained-model card template with the run's config, training objective (`positive_actions`: the
    actions whose events were targets, None for all), data summary and measured metrics.
    """
    template_path = _template(template_path, "pretrained_model_card.md")
    dataset = getattr(data_args, "prepared", None) or data_args.dataset
    test = results["test"]
    model_name = repo_id or f"pinfm-{Path(dataset).stem}"
    eval_results = _eval_results("next-item-recommendation", dataset, {k: v for k, v in test.items() if k != "num_users"})
    card_data = ModelCardData(
        library_name="transformers",
        license="apache-2.0",
        tags=["pinfm", "recommendation", "user-sequence", "foundation-model", "custom_code"],
        datasets=[DATASET_IDS.get(dataset, Path(dataset).stem)],
        metrics=sorted({r.metric_type for r in eval_results}),
        model_name=model_name,
        eval_results=eval_results,
    )
    losses = [name.replace("_token", "-token") for name, weight in objective.weights.items() if weight > 0]
    card = ModelCard.from_template(
        card_data,
        template_path=str(template_path),
        model_name=model_name,
        losses=", ".join(losses),
        dataset=dataset,
        events=f"{events_summary.get('events', '?'):,}",
        users=f"{events_summary.get('users', '?'):,}",
        items=f"{events_summary.get('items', '?'):,}",
        actions=", ".join(f"{k} ({v:,})" for k, v in sorted(events_summary.get("actions", {}).items())),
        positive_actions=", ".join(positive_actions) if positive_actions else "all",
        num_hash_buckets=data_args.num_hash_buckets,
        config_rows=[(k, getattr(config, k)) for k in CARD_CONFIG_FIELDS] + [(k, getattr(objective, k)) for k in CARD_OBJECTIVE_FIELDS],
        metric_rows=[(k, f"{v:.4f}") for k, v in test.items() if k != "num_users"],
        num_users=test.get("num_users"),
        history_masking="masked (HSTU's protocol)" if data_args.eval_exclude_history else "not masked",
        num_scored_items=events_summary.get("items", "?"),
        holdout=_holdout_sentence(results),
        batches=(f"packed rows, {results['per_device_train_batch_tokens']:,} events per batch" if results.get("packing")
                 else "padded rows"),
        steps=results["steps"],
        train_seconds=results["train_seconds"],
        tokens_per_s=f"{results['tokens_per_s']:,.0f}",
        peak_rss_gib=results["peak_rss_gib"],
        num_parameters=f"{results['num_parameters']:,}",
        repo_or_path=repo_id or str(model_dir),
    )
    return str(card)


def comparison_rows(report: dict[str, Any], use_case: str) -> Optional[list[tuple]]:
    """Mean +- std over seeds per strategy and peer of a `ctr_transfer.json` entry for `use_case` (None: not in it)."""
    entry = next((v for k, v in report.items() if k.split("/")[-1] == use_case and isinstance(v, dict)), None)
    if not entry or not entry.get("rows"):
        return None
    groups: dict[str, list[dict]] = {}
    for r in entry["rows"]:
        groups.setdefault(r["strategy"], []).append(r)
    for p in entry.get("peers", []):
        groups.setdefault(f"peer: {p['name']}", []).append(p)

    def stat(group: list[dict], key: str) -> str:
        values = [r[key] for r in group]
        mean = sum(values) / len(values)
        std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
        return f"{mean:.4f} +- {std:.4f}"

    return [
        (name, len(g), stat(g, "auc"), stat(g, "gauc"), stat(g, "logloss"),
         f"{100 * g[0]['trainable_share']:.1f}%" if "trainable_share" in g[0] else "")
        for name, g in groups.items()
    ]


def render_ctr_card(
    *,
    save_dir: str | Path,
    results: dict[str, Any],
    data_args: CTRDataArguments,
    model_args: Any,
    repo_id: Optional[str] = None,
    template_path: Optional[str | Path] = None,
    comparison: Optional[dict[str, Any]] = None,
    comparison_source: Optional[str] = None,
) -> str:
    """
    Fill the CTR card template (full model or LoRA adapter) with the use case, data split and measured metrics;
    `model_args` are the recipe's `CTRModelArguments` (base, transfer strategy, fusion). `comparison` is a report of
    `benchmarks/bench_ctr.py` (`ctr_transfer.json`, read from `comparison_source`): its rows for this use case become a
    table of every strategy and peer, so the card says what the adapter is worth against the alternatives.
    """
    from .transfer import TRANSFER_STRATEGIES

    template_path = _template(template_path, "ctr_model_card.md")
    dataset = data_args.dataset
    data = results["data"]
    is_adapter = model_args.transfer == "lora"
    model_name = repo_id or f"pinfm-ctr-{Path(dataset).stem}-{data['use_case']}-{model_args.transfer}"
    test = {k: v for k, v in results["test"].items() if isinstance(v, (int, float))}
    eval_results = _eval_results("click-through-rate-prediction", dataset, {k: test[k] for k in ("auc", "gauc", "logloss") if k in test})
    card_data = ModelCardData(
        library_name="peft" if is_adapter else "transformers",
        base_model=model_args.base,
        license="apache-2.0",
        tags=["pinfm", "recommendation", "ctr", "ranking", "custom_code"] + (["lora"] if is_adapter else []),
        datasets=[DATASET_IDS.get(dataset, Path(dataset).stem)],
        metrics=sorted({r.metric_type for r in eval_results}),
        model_name=model_name,
        eval_results=eval_results,
    )
    card = ModelCard.from_template(
        card_data,
        template_path=str(template_path),
        model_name=model_name,
        use_case=data["use_case"],
        base=model_args.base,
        base_revision=model_args.base_revision,
        transfer=model_args.transfer,
        transfer_description=TRANSFER_STRATEGIES[model_args.transfer],
        is_adapter=is_adapter,
        trainable_parameters=f"{results['trainable_parameters']:,}",
        model_parameters=f"{results['model_parameters']:,}",
        trainable_share=f"{100 * results['trainable_parameters'] / results['model_parameters']:.2f}%",
        dataset=dataset,
        positive_actions=", ".join(data["positive_actions"]),
        negative_actions=", ".join(data["negative_actions"]),
        max_history=data_args.max_history,
        cut_timestamp=data["cut_timestamp"],
        cut_quantile=data_args.cut_quantile,
        train_samples=f"{data['train_samples']:,}",
        test_samples=f"{data['test_samples']:,}",
        train_positive_rate=data["train_positive_rate"],
        test_positive_rate=data["test_positive_rate"],
        side_features=", ".join(data["side_features"]) or "none",
        fusion=model_args.ctr_fusion,
        metric_rows=[(k, f"{v:.4f}" if isinstance(v, float) else v) for k, v in test.items()],
        validation_samples=f"{data['validation_samples']:,}" if data.get("validation_samples") else None,
        validation_cut_quantile=data_args.validation_cut_quantile,
        best_valid_auc=f"{results['best_valid_auc']:.4f}" if results.get("best_valid_auc") is not None else "n/a",
        best_epoch=results.get("best_epoch"),
        epochs_trained=results.get("epochs_trained"),
        steps=results["steps"],
        train_seconds=results.get("train_seconds"),
        seconds_per_epoch=results["seconds_per_epoch"],
        comparison_rows=comparison_rows(comparison, data["use_case"]) if comparison else None,
        comparison_source=comparison_source,
        peak_rss_gib=results["peak_rss_gib"],
        repo_or_path=repo_id or str(save_dir),
    )
    return str(card)
