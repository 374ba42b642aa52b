"""
Transfer a pretrained PinFM into a CTR ranker (GPSD's strategies) and share fine-tuned use cases as PEFT adapters.

GPSD (Alibaba, KDD 2025) compares full transfer, sparse transfer (embeddings only) and sparse freeze (frozen
embeddings); PinFM freezes nothing but fine-tunes with a lower learning rate. `build_ctr_model` builds each of them
from one pretrained folder, and reports which parameters came from the checkpoint so the recipe can give them their
own learning rate.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers.utils import logging

from .configuration_pinfm import PinFMConfig
from .hub import cached_file_from
from .losses import PretrainingObjective
from .modeling_pinfm import PINFM_LORA_TARGET_MODULES
from .modeling_pinfm_ctr import PinFMForCTR


logger = logging.get_logger(__name__)

TRANSFER_STRATEGIES = {
    "none": "no transfer: the same architecture, randomly initialised (the baseline)",
    "full": "full transfer: every pretrained weight, all trainable",
    "sparse": "sparse transfer (GPSD): pretrained embedding tables only, dense layers random",
    "sparse_freeze": "sparse transfer + freeze (GPSD): pretrained embedding tables, frozen; dense layers random",
    "full_sparse_freeze": "full transfer + sparse freeze (GPSD): every pretrained weight, embedding tables frozen",
    "frozen_backbone": "frozen backbone: every pretrained weight, frozen; only the ranking head trains",
    "lora": "LoRA (PEFT) on the attention and MLP projections; backbone frozen; head saved with the adapter",
}
# Saved next to a PEFT adapter: the CTR config the base must be built with (head shape, side features, fusion).
CTR_CONFIG_NAME = "pinfm_ctr_config.json"
# The ranker's own parts, saved with a LoRA adapter (`ctr_item_features`: each use case's item -> feature-id table).
CTR_HEAD_MODULES = ["ctr_head", "ctr_feature_embeddings", "ctr_candidate_feature_proj", "ctr_item_bias", "ctr_item_features"]
ITEM_TABLE_MODULE = "item_embeddings.table"  # the encoder's item table, for `lora_item_embeddings_rank`


@dataclass
class TransferredModel:
    """
    Result of [`build_ctr_model`].

    Args:
        model (`nn.Module`): a `PinFMForCTR`, or a `PeftModel` around one for `strategy="lora"`.
        strategy (`str`): the transfer strategy.
        transferred (`set[str]`): names of trainable parameters whose values came from the pretrained checkpoint.
    """

    model: nn.Module
    strategy: str
    transferred: set[str]


def embedding_parameter_names(model: PinFMForCTR) -> set[str]:
    """Names of the ID embedding tables of the encoder: the "sparse" part of GPSD's sparse transfer."""
    names = set()
    for module_name, module in model.pinfm.embeddings.named_modules():
        if isinstance(module, nn.Embedding):
            names |= {f"pinfm.embeddings.{module_name}.{p}" for p, _ in module.named_parameters(recurse=False)}
    return names


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """
    `(trainable, base)` parameter counts; `base` is the size of the model without PEFT's additions (LoRA matrices
    and the trainable copies of `modules_to_save`), so `trainable / base` is the share a use case adds or changes.
    """
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    base = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n and ".modules_to_save." not in n)
    return trainable, base


def ctr_config_from_base(base: Union[str, Path], *, revision: Optional[str] = None, **ctr_fields: Any) -> PinFMConfig:
    """The base's architecture with the CTR fields set (fusion, head, side features, auxiliary loss)."""
    config = PinFMConfig.from_pretrained(base, revision=revision)
    unknown = [k for k in ctr_fields if not hasattr(config, k)]
    if unknown:
        raise ValueError(f"Unknown PinFMConfig field(s) {unknown}.")
    for key, value in ctr_fields.items():
        setattr(config, key, value)
    return PinFMConfig.from_dict(config.to_dict())  # re-validates the combination


def build_ctr_model(
    base: Union[str, Path],
    strategy: str,
    config: PinFMConfig,
    *,
    objective: Optional[PretrainingObjective] = None,
    lora_rank: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
    lora_use_dora: bool = False,
    lora_item_embeddings_rank: int = 0,
    item_features: Optional[tuple[torch.LongTensor, torch.LongTensor]] = None,
    revision: Optional[str] = None,
) -> TransferredModel:
    """
    Build a `PinFMForCTR` from the pretrained folder (or hub repo id at `revision`) `base` with a transfer strategy (see
    `TRANSFER_STRATEGIES`). `config` is the CTR config (e.g. from [`ctr_config_from_base`]); `objective` is what its
    auxiliary next-item loss follows, when `config.ctr_aux_loss_weight > 0`. Random parts are drawn from the current
    torch seed, so seed before calling for a reproducible head. With `strategy="lora"`, `lora_item_embeddings_rank > 0`
    also adapts the item table (PEFT's embedding LoRA, at that rank, with the same alpha / rank scaling): on ML-1M
    what transfers is the item table (sparse transfer + freeze is the best strategy), so a use case may need to move it.
    `lora_use_dora` makes the adapter PEFT's DoRA (each adapted weight also learns its column norms); on ML-1M `like` it
    scores as plain LoRA does.
    `item_features` (from `data.item_feature_table`) fill the model's item -> feature-id table before any adapter is
    made (`ctr_history_field_match_features`).
    """
    if strategy not in TRANSFER_STRATEGIES:
        raise ValueError(f"Unknown transfer strategy {strategy!r}; choose one of {sorted(TRANSFER_STRATEGIES)}.")
    if strategy in ("none", "sparse", "sparse_freeze"):
        model = PinFMForCTR(config)
    else:
        model = PinFMForCTR.from_pretrained(base, config=config, revision=revision)
    if item_features is not None:
        model.set_item_features(*item_features)
    embeddings = embedding_parameter_names(model)

    if strategy == "none":
        transferred = set()
    elif strategy in ("sparse", "sparse_freeze"):
        pretrained = PinFMForCTR.from_pretrained(base, config=config, revision=revision).state_dict()
        missing = embeddings - set(pretrained)
        if missing:
            raise ValueError(f"{base} has no pretrained weights for {sorted(missing)}.")
        model.load_state_dict({name: pretrained[name] for name in embeddings}, strict=False)
        if model.next_item_head is not None:
            # The popularity buffer is data, not a dense layer: keep it for the auxiliary loss's negatives.
            model.next_item_head.item_log_probs.copy_(pretrained["next_item_head.item_log_probs"])
        transferred = set(embeddings)
    else:
        head = {n for n, _ in model.named_parameters() if n.split(".")[0] in CTR_HEAD_MODULES}
        transferred = {n for n, _ in model.named_parameters()} - head

    if objective is not None:
        model.objective = objective
    if strategy in ("sparse_freeze", "full_sparse_freeze"):
        frozen = embeddings
    elif strategy in ("frozen_backbone", "lora"):
        frozen = transferred
    else:
        frozen = set()
    for name, param in model.named_parameters():
        if name in frozen:
            param.requires_grad_(False)
    transferred -= frozen

    if strategy == "lora":
        target_modules, rank_pattern, alpha_pattern = list(PINFM_LORA_TARGET_MODULES), {}, {}
        if lora_item_embeddings_rank > 0:
            if not isinstance(getattr(model.pinfm.embeddings.item_embeddings, "table", None), nn.Embedding):
                raise ValueError("`lora_item_embeddings_rank` needs one float item table (not hashed, not quantised).")
            target_modules.append(ITEM_TABLE_MODULE)
            rank_pattern[ITEM_TABLE_MODULE] = lora_item_embeddings_rank
            alpha_pattern[ITEM_TABLE_MODULE] = lora_alpha * lora_item_embeddings_rank / lora_rank
        lora_config = LoraConfig(
            r=lora_rank,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            use_dora=lora_use_dora,
            target_modules=target_modules,
            rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern,
            modules_to_save=[m for m in CTR_HEAD_MODULES if getattr(model, m, None) is not None],
        )
        model = get_peft_model(model, lora_config)
    trainable, base_size = count_parameters(model)
    logger.info(
        f"Transfer {strategy!r} ({TRANSFER_STRATEGIES[strategy]}): {trainable:,} trainable parameters, "
        f"{100 * trainable / base_size:.2f}% of the model's {base_size:,}; {len(transferred)} pretrained tensors trainable."
    )
    return TransferredModel(model=model, strategy=strategy, transferred=transferred)


def optimizer_param_groups(
    transferred: TransferredModel, *, learning_rate: float, backbone_learning_rate: float, weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """
    AdamW parameter groups: pretrained trainable weights at `backbone_learning_rate` (PinFM fine-tunes the
    foundation model gently), everything new (head, random layers, LoRA) at `learning_rate`. No weight decay on
    norms, biases and the temperature.
    """
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in transferred.model.named_parameters():
        if not param.requires_grad:
            continue
        plain_name = name.removeprefix("base_model.model.")
        pretrained = plain_name in transferred.transferred
        decay = param.ndim >= 2 and "norm" not in name
        groups.setdefault((pretrained, decay), []).append(param)
    return [
        {
            "params": params,
            "lr": backbone_learning_rate if pretrained else learning_rate,
            "weight_decay": weight_decay if decay else 0.0,
        }
        for (pretrained, decay), params in sorted(groups.items())
    ]


def save_ctr_adapter(
    model: PeftModel, save_directory: Union[str, Path], *, base: Optional[str] = None, base_revision: Optional[str] = None
) -> Path:
    """
    Save a LoRA use case: the PEFT adapter (with its head) plus the CTR config the base must be built with. `base` and
    `base_revision` name the base in `adapter_config.json` (what `PeftModel.from_pretrained` and the hub show).
    """
    save_directory = Path(save_directory)
    if base is not None:
        for peft_config in model.peft_config.values():
            peft_config.base_model_name_or_path = str(base)
            peft_config.revision = base_revision
    model.save_pretrained(str(save_directory))
    model.get_base_model().config.to_json_file(str(save_directory / CTR_CONFIG_NAME))
    return save_directory


def load_ctr_config(adapter: Union[str, Path], revision: Optional[str] = None) -> PinFMConfig:
    """The CTR config saved with an adapter (a folder or a hub repo id at `revision`)."""
    try:
        path = cached_file_from(adapter, CTR_CONFIG_NAME, revision=revision)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e} Is {str(adapter)!r} an adapter saved by `save_ctr_adapter`?") from e
    return PinFMConfig.from_json_file(str(path))


def _head_shape(config: PinFMConfig) -> dict[str, Any]:
    keys = ("ctr_fusion", "ctr_head", "ctr_head_hidden_sizes", "ctr_num_cross_layers", "ctr_feature_vocab_size",
            "ctr_feature_slots", "ctr_feature_embedding_size", "ctr_candidate_item_features", "ctr_item_feature_fields",
            "ctr_item_bias", "ctr_history_count_features", "ctr_history_recency_features",
            "ctr_history_field_match_features")
    return {k: getattr(config, k) for k in keys}


def load_ctr_adapters(
    base: Union[str, Path],
    adapters: dict[str, Union[str, Path]],
    *,
    base_model: Optional[PinFMForCTR] = None,
    revision: Optional[str] = None,
    adapter_revisions: Optional[dict[str, str]] = None,
) -> PeftModel:
    """
    Put several use-case adapters on one base model (loaded once) and return the `PeftModel`; switch between them
    with `model.set_adapter(name)`. Adapters on one base must share the head's shape (same side features). Base and
    adapters are folders or hub repo ids; `revision` is the base's, `adapter_revisions` `{name: revision}` the adapters'.
    """
    adapter_revisions = adapter_revisions or {}
    if not adapters:
        raise ValueError("Give at least one adapter: {name: folder}.")
    names = list(adapters)
    config = load_ctr_config(adapters[names[0]], adapter_revisions.get(names[0]))
    for name in names[1:]:
        other = load_ctr_config(adapters[name], adapter_revisions.get(name))
        if _head_shape(other) != _head_shape(config):
            raise ValueError(
                f"Adapter {name!r} needs a different head than {names[0]!r} "
                f"({json.dumps(_head_shape(other))} vs {json.dumps(_head_shape(config))}); load it on its own base."
            )
    if base_model is None:
        base_model = PinFMForCTR.from_pretrained(base, config=config, revision=revision)
    model = PeftModel.from_pretrained(
        base_model, str(adapters[names[0]]), adapter_name=names[0], revision=adapter_revisions.get(names[0])
    )
    for name in names[1:]:
        model.load_adapter(str(adapters[name]), adapter_name=name, revision=adapter_revisions.get(name))
    model.eval()
    return model


__all__ = [
    "CTR_CONFIG_NAME",
    "TRANSFER_STRATEGIES",
    "TransferredModel",
    "build_ctr_model",
    "count_parameters",
    "ctr_config_from_base",
    "embedding_parameter_names",
    "load_ctr_adapters",
    "load_ctr_config",
    "optimizer_param_groups",
    "save_ctr_adapter",
]
