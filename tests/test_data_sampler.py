import pytest
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers.trainer_pt_utils import get_length_grouped_indices

from pinfm_hf.data import EpochRandomSampler, LengthGroupedEpochSampler, TokenBudgetBatchSampler


BATCH_SIZE = 8
LENGTHS = torch.randint(1, 200, (203,), generator=torch.Generator().manual_seed(0)).tolist()  # 25 full batches + 3


def batches_of(indices: list[int]) -> list[list[int]]:
    return [indices[i : i + BATCH_SIZE] for i in range(0, len(indices), BATCH_SIZE)]


def padding_fraction(indices: list[int]) -> float:
    batches = batches_of(indices)
    padded = sum(max(LENGTHS[i] for i in batch) * len(batch) for batch in batches)
    return 1 - sum(LENGTHS) / padded


def test_every_index_once_in_batches_of_similar_length():
    sampler = LengthGroupedEpochSampler(LENGTHS, BATCH_SIZE, seed=1)
    indices = list(sampler)
    assert sorted(indices) == list(range(len(LENGTHS)))
    assert len(sampler) == len(LENGTHS)
    random_order = torch.randperm(len(LENGTHS), generator=torch.Generator().manual_seed(1)).tolist()
    assert padding_fraction(indices) < 0.5 * padding_fraction(random_order)


def test_batches_are_transformers_length_groups_in_shuffled_order_short_batch_last():
    indices = list(LengthGroupedEpochSampler(LENGTHS, BATCH_SIZE, seed=1))
    generator = torch.Generator().manual_seed(1)  # epoch 0
    grouped = batches_of(get_length_grouped_indices(LENGTHS, BATCH_SIZE, generator=generator))
    ours = batches_of(indices)
    assert sorted(map(sorted, ours)) == sorted(map(sorted, grouped))  # the same batches...
    assert ours[:-1] != grouped[:-1]  # ...not run from the longest to the shortest of each mega-batch
    assert ours[-1] == grouped[-1] and len(ours[-1]) == len(LENGTHS) % BATCH_SIZE


def test_order_depends_on_seed_and_epoch_only():
    sampler = LengthGroupedEpochSampler(LENGTHS, BATCH_SIZE, seed=3)
    first = list(sampler)
    torch.manual_seed(123)  # the global generator plays no part
    assert list(sampler) == first
    sampler.set_epoch(1)
    assert list(sampler) != first
    assert list(LengthGroupedEpochSampler(LENGTHS, BATCH_SIZE, seed=4)) != first
    sampler.set_epoch(0)
    assert list(sampler) == first


def test_accelerate_sets_the_epoch_and_skips_batches_on_resume():
    accelerator = Accelerator(cpu=True)
    sampler = LengthGroupedEpochSampler(LENGTHS, BATCH_SIZE, seed=5)
    loader = accelerator.prepare(DataLoader(list(range(len(LENGTHS))), batch_size=BATCH_SIZE, sampler=sampler))
    loader.set_epoch(2)  # what the recipe does before each epoch, and before skipping on resume
    resumed = accelerator.skip_first_batches(loader, 3)
    reference = LengthGroupedEpochSampler(LENGTHS, BATCH_SIZE, seed=5)
    reference.set_epoch(2)
    expected = batches_of(list(reference))
    assert [batch.tolist() for batch in loader] == expected
    assert [batch.tolist() for batch in resumed] == expected[3:]


def test_bad_batch_size_is_a_clear_error():
    with pytest.raises(ValueError, match="`batch_size`"):
        LengthGroupedEpochSampler(LENGTHS, 0)


def token_batches(lengths, max_tokens, seed=0, num_processes=1, epoch=0):
    sampler = TokenBudgetBatchSampler(EpochRandomSampler(len(lengths), seed=seed), lengths, max_tokens, num_processes)
    sampler.sampler.set_epoch(epoch)
    return sampler, list(sampler)


def test_token_budget_batches_hold_every_user_once_at_about_the_budget():
    sampler, batches = token_batches(LENGTHS, 1_000)
    assert sorted(i for batch in batches for i in batch) == list(range(len(LENGTHS)))
    assert len(batches) == len(sampler) == -(-sum(LENGTHS) // 1_000)
    tokens = [sum(LENGTHS[i] for i in batch) for batch in batches]
    assert max(tokens) <= 1_000 + max(LENGTHS) and min(tokens) >= 1_000 - 2 * max(LENGTHS)
    assert min(len(batch) for batch in batches) >= 1


def test_token_budget_batches_are_random_users_fixed_per_seed_and_epoch():
    _, first = token_batches(LENGTHS, 1_000, seed=3)
    torch.manual_seed(123)  # the global generator plays no part
    assert token_batches(LENGTHS, 1_000, seed=3)[1] == first
    _, other_epoch = token_batches(LENGTHS, 1_000, seed=3, epoch=1)
    assert other_epoch != first and len(other_epoch) == len(first)  # the same number of steps every epoch
    order = [i for batch in first for i in batch]
    assert order == torch.randperm(len(LENGTHS), generator=torch.Generator().manual_seed(3)).tolist()


def test_token_budget_batches_split_evenly_over_processes_each_user_once():
    from accelerate.data_loader import BatchSamplerShard

    sampler, batches = token_batches(LENGTHS, 1_500, num_processes=2)
    assert len(batches) % 2 == 0
    shards = [list(BatchSamplerShard(sampler, num_processes=2, process_index=rank)) for rank in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == len(batches) // 2
    seen = [i for shard in shards for batch in shard for i in batch]
    assert sorted(seen) == list(range(len(LENGTHS)))  # no user twice, none left out


def test_token_budget_batches_never_empty_with_long_examples():
    sampler, batches = token_batches([100, 1, 1, 1, 1], 10, num_processes=2)
    assert len(batches) == 4 and all(batches)


def test_accelerate_sets_the_epoch_of_token_budget_batches_and_skips_on_resume():
    accelerator = Accelerator(cpu=True)
    sampler = TokenBudgetBatchSampler(EpochRandomSampler(len(LENGTHS), seed=5), LENGTHS, 800)
    loader = accelerator.prepare(DataLoader(list(range(len(LENGTHS))), batch_sampler=sampler))
    loader.set_epoch(2)
    resumed = accelerator.skip_first_batches(loader, 3)
    expected = token_batches(LENGTHS, 800, seed=5, epoch=2)[1]
    assert [batch.tolist() for batch in loader] == expected
    assert [batch.tolist() for batch in resumed] == expected[3:]


def test_bad_token_budget_is_a_clear_error():
    with pytest.raises(ValueError, match="`max_tokens`"):
        TokenBudgetBatchSampler(EpochRandomSampler(3), [1, 2, 3], 0)
    with pytest.raises(ValueError, match="3 examples cannot give each of 4 processes a batch"):
        TokenBudgetBatchSampler(EpochRandomSampler(3), [1, 2, 3], 10, num_processes=4)
