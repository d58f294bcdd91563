"""dpo_custom_collate: padding values, shapes, masks, position ids and the agreed padded length."""

import pytest
import torch
import torch.distributed as dist

from nemo_dpo.data.collate import dpo_custom_collate

EOS = 2


def make_item(prompt_len, chosen_len, rejected_len, reward=None, first_token=10):
    """A dataset-style item: chosen/rejected padded with eos to the longer of the two."""
    width = max(chosen_len, rejected_len)

    def side(length, offset):
        ids = list(range(first_token + offset, first_token + offset + length))
        labels = [-100] * prompt_len + ids[prompt_len:]
        pad = width - length
        return torch.tensor(ids + [EOS] * pad), torch.tensor(labels + [-100] * pad)

    chosen, chosen_labels = side(chosen_len, 0)
    rejected, rejected_labels = side(rejected_len, 100)
    return {
        "chosen": chosen,
        "rejected": rejected,
        "chosen_length": chosen_len,
        "rejected_length": rejected_len,
        "chosen_labels": chosen_labels,
        "rejected_labels": rejected_labels,
        "chosen_reward": 1.0 if reward is None else reward,
        "rejected_reward": 0.0,
    }


def test_padding_shapes_and_values():
    batch = [make_item(2, 3, 5, reward=0.5), make_item(3, 6, 4)]
    out = dpo_custom_collate(batch, eos_id=EOS)
    assert set(out) == {
        *("chosen", "rejected", "chosen_length", "rejected_length", "chosen_labels", "rejected_labels"),
        *("position_ids", "rejected_position_ids", "chosen_rewards", "rejected_rewards", "sample_mask"),
        "sample_index",
    }
    assert out["chosen"].shape == out["rejected"].shape == out["chosen_labels"].shape == (2, 6)
    assert out["chosen"].tolist() == [[10, 11, 12, EOS, EOS, EOS], [10, 11, 12, 13, 14, 15]]
    assert out["rejected"].tolist() == [[110, 111, 112, 113, 114, EOS], [110, 111, 112, 113, EOS, EOS]]
    assert out["chosen_labels"].tolist() == [[-100, -100, 12, -100, -100, -100], [-100, -100, -100, 13, 14, 15]]
    assert out["rejected_labels"].tolist() == [
        [-100, -100, 112, 113, 114, -100],
        [-100, -100, -100, 113, -100, -100],
    ]
    assert out["chosen_length"].tolist() == [3, 6] and out["rejected_length"].tolist() == [5, 4]
    assert out["chosen_rewards"].tolist() == [0.5, 1.0] and out["rejected_rewards"].tolist() == [0.0, 0.0]
    assert out["chosen_rewards"].dtype == torch.float and out["chosen_length"].dtype == torch.long
    assert out["sample_mask"].tolist() == [1.0, 1.0] and out["sample_index"].tolist() == [-1, -1]
    assert out["position_ids"].tolist() == out["rejected_position_ids"].tolist() == [list(range(6))] * 2


def test_pad_to_multiple_and_fixed_length():
    batch = [make_item(2, 3, 5), make_item(1, 2, 2)]
    out = dpo_custom_collate(batch, eos_id=EOS, pad_length_to_multiple_of=4)
    assert out["chosen"].shape == (2, 8) and out["rejected_position_ids"].shape == (2, 8)
    assert (out["rejected"][:, 5:] == EOS).all() and (out["rejected_labels"][:, 5:] == -100).all()
    out = dpo_custom_collate(batch, eos_id=EOS, pad_to_length=12, pad_length_to_multiple_of=4)
    assert out["chosen"].shape == out["rejected_labels"].shape == out["position_ids"].shape == (2, 12)
    assert out["position_ids"][0].tolist() == list(range(12))
    with pytest.raises(ValueError, match="does not fit pad_to_length=4"):
        dpo_custom_collate(batch, eos_id=EOS, pad_to_length=4)
    with pytest.raises(ValueError, match="not a multiple of 8"):
        dpo_custom_collate(batch, eos_id=EOS, pad_to_length=12, pad_length_to_multiple_of=8)
    with pytest.raises(ValueError, match=">= 0"):
        dpo_custom_collate(batch, eos_id=EOS, pad_length_to_multiple_of=-1)


def test_unpaired_widths_are_padded_together():
    # Items built without pad_chosen_rejected_to_max: chosen and rejected differ in width.
    item = make_item(1, 4, 2)
    item["rejected"], item["rejected_labels"] = item["rejected"][:2], item["rejected_labels"][:2]
    out = dpo_custom_collate([item], eos_id=EOS)
    assert out["rejected"].tolist() == [[110, 111, EOS, EOS]]


def test_reset_position_ids_per_row_and_eod_mask_loss():
    # An eos inside a sequence (e.g. a multi-turn template) restarts the positions after it,
    # in the chosen and the rejected row each by its own tokens.
    item = make_item(1, 5, 5)
    item["chosen"][2] = EOS
    item["rejected"][1] = EOS
    out = dpo_custom_collate([item], eos_id=EOS, reset_position_ids=True, eod_mask_loss=True)
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert out["rejected_position_ids"].tolist() == [[0, 1, 0, 1, 2]]
    assert out["chosen_labels"][0, 2] == -100 and out["chosen_labels"][0, 3] == 13  # eos carries no loss
    plain = dpo_custom_collate([item], eos_id=EOS)
    assert plain["position_ids"].tolist() == [[0, 1, 2, 3, 4]] and plain["chosen_labels"][0, 2] == 12


def test_reset_attention_mask_is_refused():
    with pytest.raises(ValueError, match="reset_attention_mask=True is not supported"):
        dpo_custom_collate([make_item(1, 3, 3)], eos_id=EOS, reset_attention_mask=True)


def _collate_on_rank(multiple):
    rank = dist.get_rank()
    batch = [make_item(1, 3 + 4 * rank, 2)]  # rank 0: 3 tokens, rank 1: 7
    return tuple(dpo_custom_collate(batch, eos_id=EOS, pad_length_to_multiple_of=multiple)["chosen"].shape)


def test_padded_length_agreed_across_ranks(dist_pool):
    # Without the MAX all-reduce rank 0 would pad to 4 and rank 1 to 8.
    assert dist_pool.run(2, _collate_on_rank, 4) == [(1, 8), (1, 8)]
    assert dist_pool.run(2, _collate_on_rank, 1) == [(1, 7), (1, 7)]
