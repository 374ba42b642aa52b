"""
Optimizers of the pretraining recipe: AdamW for the dense layers, and for the item tables either AdamW too (small
catalogues) or [`RowWiseAdagrad`] over sparse gradients, so that the cost of a step and the optimizer's memory do not
grow with the number of items.

Why not a built-in one: AdamW and `torch.optim.SparseAdam` keep two full-size copies of the table (`exp_avg`,
`exp_avg_sq`), `torch.optim.Adagrad` one, and AdamW also reads and writes every row at every step; with 10^7 items x 64
that is 2.5 GB per copy and a step that sweeps them all. Row-wise Adagrad (FBGEMM's `EXACT_ROWWISE_ADAGRAD`, the default
of TorchRec's large tables) keeps one float per row and touches only the rows a batch looked up. FBGEMM and TorchRec do
not install against this project's torch on CPU, so it is written here: a short `torch.optim.Optimizer`.
"""

from __future__ import annotations

from collections.abc import Iterable
import torch
from torch import nn


ITEM_OPTIMIZERS = ("adamw", "rowwise_adagrad")


class RowWiseAdagrad(torch.optim.Optimizer):
    """
    Adagrad with one accumulator per row of a 2-D parameter (an embedding table): for the rows `r` in the gradient,
    `sum[r] += mean(grad[r] ** 2)` and `row[r] -= lr * grad[r] / (sqrt(sum[r]) + eps)`. Takes sparse gradients
    (`nn.Embedding(sparse=True)`: only the looked-up rows are read and written) or dense ones (every row).

    Args:
        params: the tables (2-D parameters).
        lr (`float`, *optional*, defaults to 0.01): learning rate.
        eps (`float`, *optional*, defaults to 1e-8): added to the root of the accumulator.
        initial_accumulator_value (`float`, *optional*, defaults to 0.0): the accumulators' start value.
    """

    def __init__(self, params: Iterable[nn.Parameter], lr: float = 0.01, eps: float = 1e-8, initial_accumulator_value: float = 0.0):
        if lr <= 0 or eps <= 0 or initial_accumulator_value < 0:
            raise ValueError(f"RowWiseAdagrad needs lr > 0, eps > 0 and initial_accumulator_value >= 0, got {lr}, {eps}, "
                             f"{initial_accumulator_value}.")
        super().__init__(params, dict(lr=lr, eps=eps, initial_accumulator_value=initial_accumulator_value))
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"RowWiseAdagrad trains 2-D tables, got a parameter of shape {tuple(p.shape)}.")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["sum"] = torch.full((p.shape[0],), group["initial_accumulator_value"], dtype=torch.float32,
                                              device=p.device)
                grad = p.grad
                if grad.is_sparse:
                    grad = grad.coalesce()  # one entry per row: repeated lookups summed
                    rows, values = grad.indices()[0], grad.values()
                else:
                    rows, values = None, grad
                squares = values.float().pow(2).mean(dim=1)
                if rows is None:
                    state["sum"].add_(squares)
                    scale = state["sum"].sqrt().add_(group["eps"])
                else:
                    state["sum"].index_add_(0, rows, squares)
                    scale = state["sum"].index_select(0, rows).sqrt_().add_(group["eps"])
                update = values.float() / scale.unsqueeze(1) * -group["lr"]
                if rows is None:
                    p.add_(update.to(p.dtype))
                else:
                    p.index_add_(0, rows, update.to(p.dtype))
        return loss


def item_tables(model: nn.Module) -> list[nn.Embedding]:
    """The item embedding table(s) of a PinFM model (one, or one per hash function)."""
    items = model.pinfm.embeddings.item_embeddings if hasattr(model, "pinfm") else model.embeddings.item_embeddings
    tables = [items.table] if items.num_tables == 0 else list(items.tables)
    if not all(isinstance(table, nn.Embedding) for table in tables):
        raise ValueError("The item tables are quantised: train a float model.")
    return tables


def build_optimizers(
    model: nn.Module,
    *,
    learning_rate: float,
    weight_decay: float,
    adam_beta2: float,
    item_optimizer: str = "adamw",
    item_learning_rate: float = 0.2,
) -> list[torch.optim.Optimizer]:
    """
    AdamW over every parameter (no weight decay on biases, norms and the temperature), or, with
    `item_optimizer="rowwise_adagrad"`, AdamW over all but the item tables and [`RowWiseAdagrad`] (at
    `item_learning_rate`) over the tables, which then produce sparse gradients.
    """
    if item_optimizer not in ITEM_OPTIMIZERS:
        raise ValueError(f"--item_optimizer must be one of {', '.join(ITEM_OPTIMIZERS)}, got {item_optimizer!r}.")
    sparse = item_tables(model) if item_optimizer == "rowwise_adagrad" else []
    sparse_ids = {id(table.weight) for table in sparse}
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in sparse_ids]
    decay = [p for n, p in named if p.ndim >= 2 and "norm" not in n]
    no_decay = [p for n, p in named if p.ndim < 2 or "norm" in n]
    optimizers = [torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=learning_rate, betas=(0.9, adam_beta2),
    )]
    if sparse:
        for table in sparse:
            table.sparse = True
        optimizers.append(RowWiseAdagrad([table.weight for table in sparse], lr=item_learning_rate))
    return optimizers


__all__ = ["ITEM_OPTIMIZERS", "RowWiseAdagrad", "build_optimizers", "item_tables"]
