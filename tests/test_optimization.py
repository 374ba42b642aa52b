"""Optimizers of the pretraining recipe (`pinfm_hf.optimization`): row-wise Adagrad over sparse item gradients."""

import pytest
import torch
from torch import nn

from pinfm_hf import PinFMConfig, PinFMForPretraining
from pinfm_hf.optimization import RowWiseAdagrad, build_optimizers, item_tables


def _reference_step(table: torch.Tensor, state: torch.Tensor, grad: torch.Tensor, lr: float, eps: float):
    """Row-wise Adagrad by its formula, on every row with a non-zero gradient."""
    table, state = table.clone(), state.clone()
    for row in range(table.shape[0]):
        if grad[row].any():
            state[row] += grad[row].pow(2).mean()
            table[row] -= lr * grad[row] / (state[row].sqrt() + eps)
    return table, state


def _model(**kwargs) -> PinFMForPretraining:
    config = PinFMConfig(item_vocab_size=50, action_vocab_size=4, hidden_size=16, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=32, max_position_embeddings=16, **kwargs)
    return PinFMForPretraining(config)


@pytest.mark.parametrize("sparse", [True, False])
def test_rowwise_adagrad_follows_its_formula_and_leaves_other_rows_alone(sparse):
    torch.manual_seed(0)
    embedding = nn.Embedding(10, 4, sparse=sparse)
    optimizer = RowWiseAdagrad(embedding.parameters(), lr=0.1)
    expected, state = embedding.weight.detach().clone(), torch.zeros(10)
    for ids in ([1, 3, 3], [3, 7]):  # repeated rows add up; the second step meets an accumulator
        optimizer.zero_grad()
        (embedding(torch.tensor(ids)) * torch.randn(len(ids), 4)).sum().backward()
        assert embedding.weight.grad.is_sparse == sparse
        dense_grad = embedding.weight.grad.to_dense() if sparse else embedding.weight.grad
        expected, state = _reference_step(expected, state, dense_grad, 0.1, 1e-8)
        optimizer.step()
        torch.testing.assert_close(embedding.weight.detach(), expected)
    torch.testing.assert_close(optimizer.state[embedding.weight]["sum"], state)
    assert optimizer.state[embedding.weight]["sum"].shape == (10,)  # one float per row, not a copy of the table


def test_build_optimizers_trains_the_item_tables_sparsely_and_the_rest_with_adamw():
    model = _model()
    (adamw,) = build_optimizers(model, learning_rate=1e-3, weight_decay=0.1, adam_beta2=0.98)
    assert sum(len(g["params"]) for g in adamw.param_groups) == len(list(model.parameters()))
    model = _model(num_item_hash_tables=2, item_hash_table_size=997)
    adamw, rowwise = build_optimizers(model, learning_rate=1e-3, weight_decay=0.1, adam_beta2=0.98,
                                      item_optimizer="rowwise_adagrad", item_learning_rate=0.05)
    tables = item_tables(model)
    assert len(tables) == 2 and all(t.sparse for t in tables) and rowwise.param_groups[0]["lr"] == 0.05
    assert [p for p in rowwise.param_groups[0]["params"]] == [t.weight for t in tables]
    dense = {id(p) for g in adamw.param_groups for p in g["params"]}
    assert dense.isdisjoint(id(t.weight) for t in tables)
    assert len(dense) + 2 == len(list(model.parameters()))
    # A training step: the tables get sparse gradients holding only the rows of the batch.
    model.set_item_counts(torch.ones(50))
    input_ids = torch.tensor([[4, 9, 12, 4]])
    loss = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=input_ids,
                 timestamps=torch.tensor([[10, 20, 30, 40]]), action_ids=torch.tensor([[2, 3, 2, 2]])).loss
    loss.backward()
    assert all(t.weight.grad.is_sparse for t in tables)
    before = tables[0].weight.detach().clone()
    rowwise.step()
    changed = (tables[0].weight.detach() != before).any(dim=1).nonzero().flatten()
    assert 0 < changed.numel() <= 50  # at most the rows of the 50 ids (positives and sampled negatives) of 997


def test_bad_item_optimizer_and_shapes_are_clear_errors():
    with pytest.raises(ValueError, match="--item_optimizer must be one of"):
        build_optimizers(_model(), learning_rate=1e-3, weight_decay=0.0, adam_beta2=0.98, item_optimizer="sgd")
    with pytest.raises(ValueError, match="trains 2-D tables"):
        RowWiseAdagrad([nn.Parameter(torch.zeros(3))])
