import pytest
import torch

from pinfm_hf.data import PinFMDataCollator


def features():
    return [
        {"input_ids": [5, 6, 7], "action_ids": [1, 2, 1], "timestamps": [10, 20, 30], "target_ids": 9, "label": 1.0,
         "user_id": "u1"},
        {"input_ids": [8], "action_ids": [2], "timestamps": [40], "target_ids": 4, "label": 0.0, "user_id": "u2"},
    ]


def test_right_padding_and_labels():
    batch = PinFMDataCollator(pad_token_id=0, return_labels=True)(features())
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["action_ids"].tolist() == [[1, 2, 1], [2, 0, 0]]
    assert batch["timestamps"].tolist() == [[10, 20, 30], [40, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [8, -100, -100]]
    assert batch["target_ids"].tolist() == [9, 4] and batch["target_ids"].dtype == torch.int64
    assert batch["label"].dtype == torch.float32
    assert "user_id" not in batch
    assert all(batch[k].dtype == torch.int64 for k in ("input_ids", "action_ids", "timestamps", "attention_mask"))


def test_left_padding_with_pad_token():
    batch = PinFMDataCollator(pad_token_id=3, padding_side="left")(features())
    assert batch["input_ids"].tolist() == [[5, 6, 7], [3, 3, 8]]
    assert batch["timestamps"].tolist() == [[10, 20, 30], [0, 0, 40]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert "labels" not in batch


def test_truncation_keeps_most_recent():
    batch = PinFMDataCollator(max_length=2, return_labels=True)(features())
    assert batch["input_ids"].tolist() == [[6, 7], [8, 0]]
    assert batch["timestamps"].tolist() == [[20, 30], [40, 0]]
    assert batch["labels"].tolist() == [[6, 7], [8, -100]]


def test_given_attention_mask_and_labels_are_padded():
    feats = [{"input_ids": [1, 2], "attention_mask": [0, 1], "labels": [-100, 2]}, {"input_ids": [3],
             "attention_mask": [1], "labels": [3]}]
    batch = PinFMDataCollator(return_labels=True)(feats)
    assert batch["attention_mask"].tolist() == [[0, 1], [1, 0]]
    assert batch["labels"].tolist() == [[-100, 2], [3, -100]]


def test_ragged_example_is_an_error():
    feats = features()
    feats[1]["timestamps"] = [40, 50]
    with pytest.raises(ValueError, match=r"Example 1: .*`timestamps` 2"):
        PinFMDataCollator()(feats)
    feats = features()
    del feats[1]["action_ids"]
    with pytest.raises(ValueError, match=r"Example 1 has no `action_ids`"):
        PinFMDataCollator()(feats)


def test_bad_arguments():
    with pytest.raises(ValueError, match="padding_side"):
        PinFMDataCollator(padding_side="middle")
    with pytest.raises(ValueError, match="max_length"):
        PinFMDataCollator(max_length=0)
    with pytest.raises(ValueError, match="empty"):
        PinFMDataCollator()([])


def test_tensor_inputs_and_dataloader():
    feats = [{"input_ids": torch.tensor([4, 5]), "surface_ids": torch.tensor([1, 1])}, {"input_ids": torch.tensor([6]),
             "surface_ids": torch.tensor([2])}]
    loader = torch.utils.data.DataLoader(feats, batch_size=2, collate_fn=PinFMDataCollator())
    batch = next(iter(loader))
    assert batch["surface_ids"].tolist() == [[1, 1], [2, 0]]


def test_packing_fills_rows_in_order_with_restarting_positions():
    examples = [{"input_ids": list(range(10, 10 + n)), "action_ids": [2] * n} for n in (3, 4, 2, 5, 1)]
    batch = PinFMDataCollator(pad_token_id=0, return_labels=True, positive_action_ids=[2], pack_length=7)(examples)
    # 3 + 4 fill the first row, 2 + 5 the second; 1 starts a third: in order, never reordered
    assert batch["input_ids"].tolist() == [
        [10, 11, 12, 10, 11, 12, 13],
        [10, 11, 10, 11, 12, 13, 14],
        [10, 0, 0, 0, 0, 0, 0],
    ]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3], [0, 1, 0, 1, 2, 3, 4], [0] * 7]
    assert batch["attention_mask"].tolist() == [[1] * 7, [1] * 7, [1, 0, 0, 0, 0, 0, 0]]
    assert batch["labels"].tolist()[2] == [10, -100, -100, -100, -100, -100, -100]


def test_first_fit_packing_fills_rows_longest_first_and_keeps_per_example_keys_with_their_sequences():
    examples = [{"input_ids": list(range(10, 10 + n)), "target_ids": n} for n in (4, 5, 3, 2)]
    in_order = PinFMDataCollator(pack_length=7)(examples)
    assert in_order["input_ids"].shape[0] == 3  # 4 | 5 | 3 + 2
    batch = PinFMDataCollator(pack_length=7, pack_first_fit=True)(examples)
    # 5 opens row 0, 4 opens row 1, 3 joins row 1, 2 joins row 0; each row keeps its examples in input order
    assert batch["input_ids"].tolist() == [[10, 11, 12, 13, 14, 10, 11], [10, 11, 12, 13, 10, 11, 12]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1], [0, 1, 2, 3, 0, 1, 2]]
    assert batch["target_ids"].tolist() == [5, 2, 4, 3]  # stacked in the sequences' packed order


def test_packing_truncates_to_max_length_and_keeps_per_example_keys():
    examples = features()
    batch = PinFMDataCollator(max_length=2, pack_length=4)(examples)
    assert batch["input_ids"].tolist() == [[6, 7, 8]]  # the 2 most recent events of u1, then u2
    assert batch["position_ids"].tolist() == [[0, 1, 0]]
    assert batch["target_ids"].tolist() == [9, 4]  # one per example, in order


def test_packing_refuses_what_it_cannot_pack():
    with pytest.raises(ValueError, match=r"`max_length` \(8\) must be at most `pack_length` \(4\)"):
        PinFMDataCollator(max_length=8, pack_length=4)
    with pytest.raises(ValueError, match="Example 0 has 3 events, more than `pack_length` \\(2\\)"):
        PinFMDataCollator(pack_length=2)(features())
    with pytest.raises(ValueError, match="Example 1 has no events"):
        PinFMDataCollator(pack_length=4)([{"input_ids": [1]}, {"input_ids": []}])
