import math

import pytest
import torch
import torch.nn.functional as F

from pinfm_hf import PinFMConfig, PinFMForPretraining
from pinfm_hf.losses import (
    ScoresLogSumExp,
    contrastive_loss,
    full_softmax_loss,
    masked_mean,
    popularity_cdf,
    sample_negatives,
    sampled_softmax_loss,
    scores_logsumexp,
)


def _manual_loss(pos_logit: float, neg_logits: list) -> float:
    """`-log softmax(logits)[0]` computed by hand from Python floats."""
    logits = [pos_logit] + list(neg_logits)
    return -(pos_logit - math.log(sum(math.exp(x) for x in logits)))


def _normed(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


# A 2x3 toy case in D=2: unit vectors, so every dot product is easy to read.
QUERY = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # [N=2, D=2]
POS = torch.tensor([[0.6, 0.8], [0.0, 1.0]])  # [N, D]; dots 0.6 and 1.0
NEG = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])  # [R=3, D]
# dots with NEG: row 0 -> [1, 0, -1], row 1 -> [0, 1, 0]
POS_DOTS = [0.6, 1.0]
NEG_DOTS = [[1.0, 0.0, -1.0], [0.0, 1.0, 0.0]]


class TestSampledSoftmaxLoss:
    def test_matches_manual_log_softmax(self):
        t = 0.5
        loss = sampled_softmax_loss(QUERY, POS, NEG, temperature=t)
        expected = [_manual_loss(p / t, [n / t for n in ns]) for p, ns in zip(POS_DOTS, NEG_DOTS)]
        assert loss.shape == (2,)
        torch.testing.assert_close(loss, torch.tensor(expected), rtol=1e-5, atol=1e-5)

    def test_log_q_is_subtracted_from_both_positive_and_negative_logits(self):
        t = 0.5
        pos_log_q = torch.tensor([-1.0, -3.0])  # [N]
        neg_log_q = torch.tensor([-0.5, -2.0, -4.0])  # [R]
        loss = sampled_softmax_loss(QUERY, POS, NEG, temperature=t, pos_log_q=pos_log_q, neg_log_q=neg_log_q)
        expected = [
            _manual_loss(p / t - pq, [n / t - nq for n, nq in zip(ns, neg_log_q.tolist())])
            for p, pq, ns in zip(POS_DOTS, pos_log_q.tolist(), NEG_DOTS)
        ]
        torch.testing.assert_close(loss, torch.tensor(expected), rtol=1e-5, atol=1e-5)
        plain = sampled_softmax_loss(QUERY, POS, NEG, temperature=t)
        assert not torch.allclose(loss, plain)

    def test_per_row_log_q(self):
        neg_log_q = torch.tensor([[-0.5, -2.0, -4.0], [-1.0, -1.0, -3.0]])  # [N, R]
        loss = sampled_softmax_loss(QUERY, POS, NEG, temperature=1.0, neg_log_q=neg_log_q)
        expected = [
            _manual_loss(p, [n - q for n, q in zip(ns, qs)])
            for p, ns, qs in zip(POS_DOTS, NEG_DOTS, neg_log_q.tolist())
        ]
        torch.testing.assert_close(loss, torch.tensor(expected), rtol=1e-5, atol=1e-5)

    def test_accidental_hit_is_ignored(self):
        pos_ids = torch.tensor([7, 9])
        neg_ids = torch.tensor([7, 3, 9])  # id 7 is row 0's positive, id 9 row 1's
        loss = sampled_softmax_loss(QUERY, POS, NEG, temperature=0.5, pos_ids=pos_ids, neg_ids=neg_ids)
        without_row0 = sampled_softmax_loss(QUERY[:1], POS[:1], NEG[1:], temperature=0.5)
        without_row1 = sampled_softmax_loss(QUERY[1:], POS[1:], NEG[:2], temperature=0.5)
        torch.testing.assert_close(loss, torch.cat([without_row0, without_row1]))

    def test_accidental_hit_with_per_row_negative_ids(self):
        pos_ids = torch.tensor([7, 9])
        neg_ids = torch.tensor([[1, 7, 2], [9, 3, 4]])  # [N, R]
        loss = sampled_softmax_loss(QUERY, POS, NEG, temperature=1.0, pos_ids=pos_ids, neg_ids=neg_ids)
        expected = [_manual_loss(0.6, [1.0, -1.0]), _manual_loss(1.0, [1.0, 0.0])]
        torch.testing.assert_close(loss, torch.tensor(expected), rtol=1e-5, atol=1e-5)

    def test_shared_and_per_row_negatives_agree(self):
        N, R, D = 5, 4, 8
        query, pos, neg = _normed(N, D, seed=1), _normed(N, D, seed=2), _normed(R, D, seed=3)
        pos_ids, neg_ids = torch.tensor([0, 1, 2, 3, 4]), torch.tensor([2, 5, 6, 0])
        neg_log_q = -torch.rand(R, dtype=torch.float64)
        kwargs = dict(temperature=0.1, pos_ids=pos_ids, pos_log_q=-torch.rand(N, dtype=torch.float64))
        shared = sampled_softmax_loss(query, pos, neg, neg_ids=neg_ids, neg_log_q=neg_log_q, **kwargs)
        per_row = sampled_softmax_loss(
            query,
            pos,
            neg.expand(N, R, D),
            neg_ids=neg_ids.expand(N, R),
            neg_log_q=neg_log_q.expand(N, R),
            **kwargs,
        )
        torch.testing.assert_close(shared, per_row)

    def test_all_negatives_masked_is_finite(self):
        query = _normed(3, 4, seed=4).float().requires_grad_()
        pos = _normed(3, 4, seed=5).float()
        neg = _normed(2, 4, seed=6).float()
        pos_ids = torch.tensor([1, 1, 1])
        neg_ids = torch.tensor([1, 1])
        loss = sampled_softmax_loss(query, pos, neg, temperature=0.05, pos_ids=pos_ids, neg_ids=neg_ids)
        torch.testing.assert_close(loss, torch.zeros(3))
        loss.sum().backward()
        assert torch.isfinite(query.grad).all()

    def test_gradient_flows_to_learnable_temperature(self):
        temperature = torch.tensor(0.5, requires_grad=True)
        loss = sampled_softmax_loss(QUERY, POS, NEG, temperature=temperature)
        loss.mean().backward()
        assert temperature.grad is not None and temperature.grad.abs() > 0
        torch.testing.assert_close(loss, sampled_softmax_loss(QUERY, POS, NEG, temperature=0.5))

    def test_low_precision_inputs_give_float32_loss(self):
        q, p, n = QUERY.bfloat16(), POS.bfloat16(), NEG.bfloat16()
        loss = sampled_softmax_loss(q, p, n, temperature=0.5)
        assert loss.dtype == torch.float32
        reference = sampled_softmax_loss(q.float(), p.float(), n.float(), temperature=0.5)
        torch.testing.assert_close(loss, reference, rtol=1e-2, atol=1e-2)

    def test_bad_arguments(self):
        with pytest.raises(ValueError, match="neg_emb"):
            sampled_softmax_loss(QUERY, POS, torch.randn(3, 5), temperature=1.0)
        with pytest.raises(ValueError, match="pos_ids"):
            sampled_softmax_loss(QUERY, POS, NEG, temperature=1.0, pos_ids=torch.tensor([0, 1]))
        with pytest.raises(ValueError, match="temperature"):
            sampled_softmax_loss(QUERY, POS, NEG, temperature=0.0)


class TestFullSoftmaxLoss:
    def test_matches_cross_entropy(self):
        query, items = _normed(6, 8, seed=7).float(), _normed(11, 8, seed=8).float()
        targets = torch.tensor([0, 3, 10, 5, 5, 1])
        loss = full_softmax_loss(query, items, targets, temperature=0.2)
        expected = F.cross_entropy(query @ items.T / 0.2, targets, reduction="none")
        torch.testing.assert_close(loss, expected)

    def test_ignored_rows_are_zero(self):
        query, items = _normed(4, 8, seed=9).float(), _normed(11, 8, seed=10).float()
        targets = torch.tensor([2, -100, 7, -100])
        loss = full_softmax_loss(query, items, targets, temperature=0.2)
        assert loss.shape == (4,)
        assert loss[1] == 0 and loss[3] == 0
        expected = F.cross_entropy(query[[0, 2]] @ items.T / 0.2, targets[[0, 2]], reduction="none")
        torch.testing.assert_close(loss[[0, 2]], expected)
        custom = full_softmax_loss(query, items, targets.clamp(min=0), temperature=0.2, ignore_index=0)
        assert custom[1] == 0

    def test_bad_shapes(self):
        with pytest.raises(ValueError, match="target_ids"):
            full_softmax_loss(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1]), temperature=1.0)


class TestScoresLogSumExp:
    """The full softmax's log-partition, a block of queries at a time, with gradients recomputed per block."""

    @pytest.mark.parametrize("block_elements", [1, 40, 1 << 22])  # one query per block, a ragged last block, one block
    # Logits up to 5 are shifted by their Cauchy-Schwarz bound; up to 200 (exp overflows unshifted) by the row maximum.
    @pytest.mark.parametrize("scale", [5.0, 200.0])
    def test_value_and_gradients_match_logsumexp(self, monkeypatch, block_elements, scale):
        monkeypatch.setattr(ScoresLogSumExp, "BLOCK_ELEMENTS", block_elements)
        query = (_normed(7, 8, seed=1).float() * scale).requires_grad_()
        items = _normed(13, 8, seed=2).float().requires_grad_()
        weights = torch.rand(7, generator=torch.Generator().manual_seed(3))
        (scores_logsumexp(query, items) * weights).sum().backward()
        reference_query, reference_items = query.detach().clone().requires_grad_(), items.detach().clone().requires_grad_()
        expected = torch.logsumexp(reference_query @ reference_items.T, dim=-1)
        (expected * weights).sum().backward()
        torch.testing.assert_close(scores_logsumexp(query, items), expected)
        torch.testing.assert_close(query.grad, reference_query.grad)
        torch.testing.assert_close(items.grad, reference_items.grad)

    def test_rows_with_loose_and_tight_bounds_in_one_block(self):
        """A block that mixes rows under and over `MAX_BOUND_SHIFT` falls back to row maxima for all of them."""
        query = _normed(6, 8, seed=6).float() * torch.tensor([1.0, 60.0, 3.0, 41.0, 0.5, 39.0])[:, None]
        items = _normed(11, 8, seed=7).float() * 0.9
        torch.testing.assert_close(scores_logsumexp(query, items), torch.logsumexp(query @ items.T, dim=-1))

    def test_autocast_runs_the_products_in_its_dtype(self):
        query, items = (_normed(5, 8, seed=4).float() * 5).requires_grad_(), _normed(9, 8, seed=5).float().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = scores_logsumexp(query, items)
        low.sum().backward()
        assert low.dtype == torch.float32 and query.grad.dtype == torch.float32 and items.grad.dtype == torch.float32
        exact = torch.logsumexp(query.detach() @ items.detach().T, dim=-1)
        assert not torch.equal(low.detach(), exact)  # the products were rounded to bf16 ...
        torch.testing.assert_close(low.detach(), exact, atol=0.05, rtol=0.01)  # ... and only that


class TestSampleNegatives:
    def test_uniform_range_and_log_q(self):
        g = torch.Generator().manual_seed(0)
        ids, log_q = sample_negatives(5000, vocab_size=20, first_id=4, generator=g)
        assert ids.shape == log_q.shape == (5000,)
        assert ids.dtype == torch.long
        assert ids.min() >= 4 and ids.max() < 20
        assert set(ids.tolist()) == set(range(4, 20))
        torch.testing.assert_close(log_q, torch.full((5000,), -math.log(16)))

    def test_reproducible_with_generator(self):
        a = sample_negatives(50, vocab_size=100, generator=torch.Generator().manual_seed(3))
        b = sample_negatives(50, vocab_size=100, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(a, b)

    def test_popularity_sampling_follows_probs(self):
        probs = torch.tensor([0.0, 0.5, 0.3, 0.15, 0.05])
        n = 20000
        ids, log_q = sample_negatives(n, probs=probs, generator=torch.Generator().manual_seed(0))
        assert ids.min() >= 1 and ids.max() <= 4
        freq = torch.bincount(ids, minlength=5).float() / n
        torch.testing.assert_close(freq, probs, atol=0.02, rtol=0)
        torch.testing.assert_close(log_q, probs[ids].log())

    def test_popularity_sampling_normalises_and_respects_first_id(self):
        weights = torch.tensor([100.0, 100.0, 1.0, 3.0])  # ids 0 and 1 are special, never drawn
        ids, log_q = sample_negatives(1000, probs=weights, first_id=2, generator=torch.Generator().manual_seed(0))
        assert set(ids.tolist()) <= {2, 3}
        torch.testing.assert_close(log_q, torch.tensor([0.25, 0.75]).log()[ids - 2])

    def test_sampling_from_a_cdf_follows_the_popularity_and_skips_special_and_zero_ids(self):
        counts = torch.tensor([0.0, 0.0, 5.0, 0.0, 3.0, 2.0])  # ids 0, 1 special; id 3 never seen
        log_probs = torch.log(counts / counts.sum() + 1e-30)
        cdf = popularity_cdf(log_probs, first_id=2)
        assert cdf.dtype == torch.float64 and cdf[-1] == 1.0
        ids, log_q = sample_negatives(40000, cdf=cdf, first_id=2, generator=torch.Generator().manual_seed(0))
        assert set(ids.tolist()) == {2, 4, 5}
        freq = torch.bincount(ids, minlength=6).float() / ids.numel()
        torch.testing.assert_close(freq, counts / counts.sum(), atol=0.01, rtol=0)
        torch.testing.assert_close(log_q, (counts / counts.sum()).log()[ids])

    def test_the_model_caches_its_cdf_until_the_counts_change(self):
        config = PinFMConfig(item_vocab_size=12, action_vocab_size=4, hidden_size=16, num_hidden_layers=1,
                             num_attention_heads=2, intermediate_size=32, max_position_embeddings=16)
        head = PinFMForPretraining(config).next_item_head
        assert head.popularity_cdf() is None and not head.has_item_counts
        head.set_item_counts(torch.arange(12.0))
        first = head.popularity_cdf()
        assert head.popularity_cdf() is first  # no sweep of the vocabulary at the next step
        head.load_state_dict({**head.state_dict(), "item_log_probs": torch.log(torch.ones(12) / 8)})  # a checkpoint
        reloaded = head.popularity_cdf()
        assert reloaded is not first
        torch.testing.assert_close(reloaded, torch.arange(1, 9, dtype=torch.float64) / 8)

    @pytest.mark.parametrize(
        "kwargs, match",
        [
            (dict(num_samples=0, vocab_size=10), "num_samples"),
            (dict(num_samples=5), "exactly one"),
            (dict(num_samples=5, vocab_size=10, probs=torch.ones(10)), "exactly one"),
            (dict(num_samples=5, probs=torch.ones(10), cdf=torch.ones(10, dtype=torch.float64)), "exactly one"),
            (dict(num_samples=5, vocab_size=3, first_id=3), "vocab_size"),
            (dict(num_samples=5, vocab_size=10, first_id=-1), "first_id"),
            (dict(num_samples=5, probs=torch.ones(2, 3)), "probs"),
            (dict(num_samples=5, probs=torch.tensor([1.0, -1.0, 1.0])), "non-negative"),
            (dict(num_samples=5, probs=torch.tensor([1.0, 0.0, 0.0]), first_id=1), "positive sum"),
        ],
    )
    def test_bad_arguments(self, kwargs, match):
        num_samples = kwargs.pop("num_samples")
        with pytest.raises(ValueError, match=match):
            sample_negatives(num_samples, **kwargs)


class TestContrastiveLoss:
    def test_matches_cross_entropy_both_ways(self):
        a, b = _normed(5, 4, seed=1), _normed(5, 4, seed=2)
        logits = a @ b.T / 0.5
        expected = (F.cross_entropy(logits, torch.arange(5)) + F.cross_entropy(logits.T, torch.arange(5))) / 2
        torch.testing.assert_close(contrastive_loss(a, b, temperature=0.5), expected.float())

    def test_queries_with_the_same_target_are_not_negatives(self):
        a, b = _normed(4, 3, seed=3), _normed(4, 3, seed=4)
        targets = torch.tensor([7, 7, 8, 9])
        logits = a @ b.T / 0.2
        logits[0, 1] = logits[1, 0] = float("-inf")  # 0 and 1 share target 7: neither is the other's negative
        expected = (F.cross_entropy(logits, torch.arange(4)) + F.cross_entropy(logits.T, torch.arange(4))) / 2
        torch.testing.assert_close(contrastive_loss(a, b, targets, temperature=0.2), expected.float())
        assert not torch.isclose(contrastive_loss(a, b, temperature=0.2), expected.float())

    def test_identical_views_far_apart_have_a_lower_loss_than_mixed_ones(self):
        a = torch.eye(4, dtype=torch.float64)
        assert contrastive_loss(a, a, temperature=0.1) < 1e-3
        assert contrastive_loss(a, a.roll(1, dims=0), temperature=0.1) > 5

    def test_empty_and_bad_inputs(self):
        a = torch.zeros(0, 3, requires_grad=True)
        out = contrastive_loss(a, a * 1.0, temperature=0.1)
        out.backward()
        assert out.item() == 0
        with pytest.raises(ValueError, match="view_a"):
            contrastive_loss(torch.zeros(2, 3), torch.zeros(3, 3), temperature=0.1)
        with pytest.raises(ValueError, match="temperature"):
            contrastive_loss(torch.zeros(2, 3), torch.zeros(2, 3), temperature=0.0)


class TestMaskedMean:
    def test_mean_over_mask(self):
        loss = torch.tensor([1.0, 2.0, 3.0, float("nan")])
        mask = torch.tensor([True, False, True, False])
        torch.testing.assert_close(masked_mean(loss, mask), torch.tensor(2.0))

    def test_empty_mask_is_zero_with_grad(self):
        x = torch.randn(4, requires_grad=True)
        loss = x * 2
        out = masked_mean(loss, torch.zeros(4, dtype=torch.bool))
        assert out.item() == 0 and not torch.isnan(out)
        assert out.requires_grad
        out.backward()
        torch.testing.assert_close(x.grad, torch.zeros(4))

    def test_empty_input(self):
        x = torch.zeros(0, requires_grad=True)
        out = masked_mean(x * 1.0, torch.zeros(0, dtype=torch.bool))
        out.backward()
        assert out.item() == 0
