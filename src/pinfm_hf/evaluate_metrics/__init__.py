"""
Hugging Face `evaluate` modules shipped inside the package.

`evaluate.load("roc_auc")` fetches the metric script from the Hub, which fails offline, and GAUC is not on the Hub at
all, so the CTR metrics (AUC, GAUC, log loss) live here as a local `evaluate.Metric` script, loaded by path. Loading a
local script makes no network call, so no `HF_HUB_OFFLINE` / `HF_EVALUATE_OFFLINE` is needed.
"""

from pathlib import Path
from typing import TYPE_CHECKING


if TYPE_CHECKING:
    import evaluate

CTR_METRICS_PATH: Path = Path(__file__).resolve().parent / "ctr_metrics"
"""Folder of the `ctr_metrics` evaluate module (`ctr_metrics/ctr_metrics.py`); `evaluate.load` accepts it as a path."""


def load_ctr_metric(**kwargs) -> "evaluate.EvaluationModule":
    """
    Load the CTR metrics (`auc`, `gauc`, `logloss`, ...) as an `evaluate` module, from the package, without the Hub.

    Use it like any `evaluate` metric: `add_batch(predictions=..., references=..., user_ids=...)` then `compute()`.

    Args:
        kwargs: forwarded to `evaluate.load` (e.g. `experiment_id`, `num_process`, `process_id`, `keep_in_memory`).

    Returns:
        `evaluate.EvaluationModule`: the `ctr_metrics` metric.
    """
    import evaluate

    return evaluate.load(str(CTR_METRICS_PATH), **kwargs)


__all__ = ["CTR_METRICS_PATH", "load_ctr_metric"]
