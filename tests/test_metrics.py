import math

import pytest
import torch

from pinfm_hf.metrics import rank_of_targets, retrieval_metrics, summarize


def _descending_scores(batch_size: int, num_ids: int) -> torch.Tensor:
    """Scores where id `i` is ranked `i + 1` in every row (all distinct)."""
    return -torch.arange(num_ids, dtype=torch.float32).expand(batch_size, num_ids).clone()  # [B, V]


class TestRankOfTargets:
    def test_known_ranks(self):
        scores = _descending_scores(4, 400)
        targets = torch.tensor([0, 2, 11, 299])
        ranks = rank_of_targets(scores, targets)
        assert ranks.dtype == torch.long
        assert ranks.tolist() == [1, 3, 12, 300]

    def test_random_scores_match_argsort(self):
        g = torch.Generator().manual_seed(0)
        scores = torch.randn(8, 50, generator=g)
        targets = torch.randint(0, 50, (8,), generator=g)
        ranks = rank_of_targets(scores, targets)
        order = scores.argsort(dim=1, descending=True)
        expected = (order == targets[:, None]).float().argmax(dim=1) + 1
        assert ranks.tolist() == expected.tolist()

    def test_exclude_mask(self):
        scores = _descending_scores(2, 10)
        targets = torch.tensor([5, 5])
        exclude = torch.zeros(2, 10, dtype=torch.bool)
        exclude[0, [0, 1, 7]] = True  # two better ids (0, 1) and one worse (7) excluded in row 0
        assert rank_of_targets(scores, targets, exclude_mask=exclude).tolist() == [4, 6]

    def test_invalid_ids(self):
        scores = _descending_scores(2, 10)
        targets = torch.tensor([5, 2])
        assert rank_of_targets(scores, targets, invalid_ids=[0, 1]).tolist() == [4, 1]
        assert rank_of_targets(scores, targets, invalid_ids=torch.tensor([0, 1])).tolist() == [4, 1]

    def test_target_is_never_excluded(self):
        scores = _descending_scores(1, 10)
        targets = torch.tensor([3])
        exclude = torch.zeros(1, 10, dtype=torch.bool)
        exclude[0, 3] = True
        assert rank_of_targets(scores, targets, exclude_mask=exclude, invalid_ids=[3]).tolist() == [4]
        assert rank_of_targets(scores, targets, exclude_mask=exclude, ties="pessimistic").tolist() == [4]

    def test_does_not_modify_scores(self):
        scores = _descending_scores(2, 10)
        before = scores.clone()
        exclude = torch.ones(2, 10, dtype=torch.bool)
        rank_of_targets(scores, torch.tensor([1, 2]), invalid_ids=[0], exclude_mask=exclude)
        torch.testing.assert_close(scores, before)

    def test_ties(self):
        scores = torch.tensor(
            [
                [0.9, 0.5, 0.5, 0.5, 0.1],  # target id 2 ties with ids 1 and 3
                [0.3, 0.3, 0.3, 0.3, 0.3],  # everything ties
            ]
        )
        targets = torch.tensor([2, 0])
        assert rank_of_targets(scores, targets).tolist() == [2, 1]
        assert rank_of_targets(scores, targets, ties="optimistic").tolist() == [2, 1]
        assert rank_of_targets(scores, targets, ties="pessimistic").tolist() == [4, 5]
        # Excluded ids don't count as ties.
        assert rank_of_targets(scores, targets, invalid_ids=[1, 4], ties="pessimistic").tolist() == [3, 3]

    def test_bad_arguments(self):
        scores = torch.zeros(2, 5)
        with pytest.raises(ValueError, match="ties"):
            rank_of_targets(scores, torch.tensor([0, 1]), ties="average")
        with pytest.raises(ValueError, match="target_ids"):
            rank_of_targets(scores, torch.tensor([0, 5]))
        with pytest.raises(ValueError, match="target_ids"):
            rank_of_targets(scores, torch.tensor([0]))
        with pytest.raises(ValueError, match="exclude_mask"):
            rank_of_targets(scores, torch.tensor([0, 1]), exclude_mask=torch.zeros(2, 4, dtype=torch.bool))


class TestRetrievalMetrics:
    def test_hand_computed(self):
        ranks = torch.tensor([1, 3, 12, 300])
        metrics = retrieval_metrics(ranks, ks=(10, 50))
        assert list(metrics) == ["hr@10", "ndcg@10", "hr@50", "ndcg@50", "mrr"]
        expected = {
            "hr@10": [1.0, 1.0, 0.0, 0.0],
            "ndcg@10": [1.0, 0.5, 0.0, 0.0],  # 1 / log2(1 + 1), 1 / log2(3 + 1)
            "hr@50": [1.0, 1.0, 1.0, 0.0],
            "ndcg@50": [1.0, 0.5, 1 / math.log2(13), 0.0],
            "mrr": [1.0, 1 / 3, 1 / 12, 1 / 300],
        }
        for name, values in expected.items():
            assert metrics[name].shape == (4,)
            torch.testing.assert_close(metrics[name], torch.tensor(values))

    def test_rank_equal_to_k_is_a_hit(self):
        metrics = retrieval_metrics(torch.tensor([10, 11]), ks=(10,))
        assert metrics["hr@10"].tolist() == [1.0, 0.0]

    def test_end_to_end_with_summarize(self):
        scores = _descending_scores(4, 400)
        ranks = rank_of_targets(scores, torch.tensor([0, 2, 11, 299]))
        summary = summarize(retrieval_metrics(ranks))
        assert set(summary) == {"hr@10", "ndcg@10", "hr@50", "ndcg@50", "hr@200", "ndcg@200", "mrr"}
        assert all(isinstance(v, float) for v in summary.values())
        assert summary["hr@10"] == pytest.approx(0.5)
        assert summary["ndcg@10"] == pytest.approx((1 + 0.5) / 4)
        assert summary["hr@200"] == pytest.approx(0.75)
        assert summary["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 12 + 1 / 300) / 4)

    def test_bad_arguments(self):
        with pytest.raises(ValueError, match="1-based"):
            retrieval_metrics(torch.tensor([0, 1]))
        with pytest.raises(ValueError, match="ks"):
            retrieval_metrics(torch.tensor([1, 2]), ks=(0,))


def test_nan_scores_never_reward_the_target():
    nan = float("nan")
    scores = torch.tensor([[0.1, nan, 0.3, 0.2], [nan, nan, nan, nan], [0.5, 0.1, nan, 0.0], [0.5, 0.1, 0.2, 0.0]])
    targets = torch.tensor([1, 2, 0, 0])
    # A NaN target ranks last; a NaN rival ranks above the target; finite rows are unchanged.
    assert rank_of_targets(scores, targets).tolist() == [4, 4, 2, 1]
    assert rank_of_targets(scores, targets, ties="pessimistic").tolist() == [4, 4, 2, 1]
    assert rank_of_targets(scores, targets, exclude_mask=torch.tensor([[0, 0, 1, 1]] * 4).bool()).tolist() == [2, 3, 1, 1]  # excluded NaNs do not count
