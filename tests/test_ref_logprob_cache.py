"""Precomputed reference log-probs (``model.dpo.precompute_ref_log_probs``): equal, reused, refreshed, checked."""

import json
import math

import pytest
import torch

from dpo_workers import synthetic_pairs, train_dpo, weights_fingerprint
from nemo_dpo.algorithms.ref_logprob_cache import RefLogprobTable, fingerprint_files

LN2_FP32 = torch.tensor(math.log(2), dtype=torch.float32).item()
ITEMS = synthetic_pairs(19)  # 4 steps of 4 per epoch, 3 pairs left out of epoch 1; validation: 15 pairs
STEPS = 5  # the 5th step is in the second epoch, whose batches differ from those the cache was computed in
KEYS = ("train/loss", "train/acc", "train/grad_norm", "val/loss", "val/acc")


def _train(dist_pool, log_dir, cache_dir, world=1, items=ITEMS, init_seed=0, parts=None):
    ref_cache = None if cache_dir is None else {"directory": str(cache_dir), "parts": parts or {}}
    return dist_pool.run(world, train_dpo, 1, 1, 2, 4, STEPS, items, str(log_dir), None, 32, None, False, None,
                         init_seed, ref_cache)


def _series(result, key):
    return [r[key] for r in result[0]["records"] if key in r]


@pytest.fixture(scope="module")
def first_runs(dist_pool, tmp_path_factory):
    """On the fly, then with a fresh cache, then again with that cache."""
    cache = tmp_path_factory.mktemp("cache")
    on_the_fly = _train(dist_pool, tmp_path_factory.mktemp("fly"), None)
    computed = _train(dist_pool, tmp_path_factory.mktemp("computed"), cache)
    reused = _train(dist_pool, tmp_path_factory.mktemp("reused"), cache)
    return cache, on_the_fly, computed, reused


def _copy(cache, to):
    """A copy of the first runs' cache folder (tests that change it work on their own)."""
    to.mkdir()
    for path in cache.glob("*.safetensors"):
        (to / path.name).write_bytes(path.read_bytes())
    return to


def test_precomputed_equals_on_the_fly(first_runs):
    _, on_the_fly, computed, _ = first_runs
    assert _series(computed, "train/loss")[0] == LN2_FP32 and _series(computed, "train/acc")[0] == 0.0
    for key in KEYS:
        assert _series(computed, key) == pytest.approx(_series(on_the_fly, key), abs=1e-6), key
    # One forward per global batch of each set: 5 training (19 pairs), 4 validation (15 pairs).
    assert computed[0]["ref_forwards"] == 5 + 4
    assert any("no cache yet" in m for m in computed[0]["cache_log"])


def test_second_run_reuses_the_cache(first_runs):
    cache, _, computed, reused = first_runs
    assert reused[0]["ref_forwards"] == 0
    assert sum("read from" in m for m in reused[0]["cache_log"]) == 2
    for key in KEYS:
        assert _series(reused, key) == _series(computed, key), key
    assert sorted(p.name.split("-")[0] for p in cache.glob("*.safetensors")) == ["train", "validation"]


@pytest.mark.parametrize("change", ["data", "weights", "tokenizer"])
def test_a_change_recomputes_naming_it(dist_pool, first_runs, tmp_path, change):
    cache, _, computed, _ = first_runs
    items, init_seed, parts = ITEMS, 0, None
    if change == "data":  # one token of one pair
        items = [dict(item) for item in ITEMS]
        items[2]["chosen"] = items[2]["chosen"].clone()
        items[2]["chosen"][1] = (items[2]["chosen"][1] + 1) % 59 + 1
    elif change == "weights":
        init_seed = 1
    else:
        parts = {"tokenizer": "another"}
    result = _train(dist_pool, tmp_path / "log", _copy(cache, tmp_path / "cache"), items=items, init_seed=init_seed,
                    parts=parts)
    assert result[0]["ref_forwards"] > 0
    expected = {"data": "items changed", "weights": "weights changed", "tokenizer": "tokenizer changed"}[change]
    assert any(expected in m for m in result[0]["cache_log"]), result[0]["cache_log"]
    if change == "data":
        assert _series(result, "train/loss") != _series(computed, "train/loss")


def test_damaged_cache_file_is_named_and_recomputed(dist_pool, first_runs, tmp_path):
    cache, _, computed, _ = first_runs
    damaged = _copy(cache, tmp_path / "cache")
    (train_file,) = damaged.glob("train-*.safetensors")
    data = bytearray(train_file.read_bytes())
    data[-5] ^= 0xFF  # a log-prob's bytes
    train_file.write_bytes(bytes(data))
    result = _train(dist_pool, tmp_path / "log", damaged)
    assert any(str(train_file) in m and "damaged" in m for m in result[0]["cache_log"]), result[0]["cache_log"]
    assert result[0]["ref_forwards"] == 5  # training recomputed, validation read
    assert _series(result, "train/loss") == _series(computed, "train/loss")
    assert _train(dist_pool, tmp_path / "again", damaged)[0]["ref_forwards"] == 0  # rewritten intact


def test_data_parallel_two_ranks(dist_pool, first_runs, tmp_path):
    _, on_the_fly, _, _ = first_runs
    result = _train(dist_pool, tmp_path / "log", tmp_path / "cache", world=2)
    assert [r["ref_forwards"] for r in result] == [5 + 4, 5 + 4]
    for key in KEYS:  # DP=2 sums in another order than DP=1
        assert _series(result, key) == pytest.approx(_series(on_the_fly, key), abs=1e-5), key
    again = _train(dist_pool, tmp_path / "again", tmp_path / "cache", world=2)
    assert [r["ref_forwards"] for r in again] == [0, 0]
    assert _series(again, "train/loss") == _series(result, "train/loss")


def test_weights_fingerprint_is_layout_independent(dist_pool):
    single = dist_pool.run(1, weights_fingerprint, 1, 1)
    split = dist_pool.run(2, weights_fingerprint, 2, 1)
    assert split == single * 2
    assert dist_pool.run(1, weights_fingerprint, 1, 1, 1) != single


def test_file_fingerprint_sees_one_changed_line(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a", "chosen_response": "b", "rejected_response": "c"}\n' * 3)
    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    (tokenizer / "tokenizer.json").write_text("{}")
    before = fingerprint_files([data]), fingerprint_files([tokenizer])
    data.write_text(data.read_text().replace('"c"', '"d"', 1))
    (tokenizer / "tokenizer.json").write_text('{"a": 1}')
    after = fingerprint_files([data]), fingerprint_files([tokenizer])
    assert before[0] != after[0] and before[1] != after[1]


def test_table_round_trip_and_lookup():
    rows = {3: (torch.tensor([-1.0, -2.0]), torch.tensor([-3.0])), 0: (torch.tensor([-4.0]), torch.tensor([]))}
    table = RefLogprobTable.from_tensors(RefLogprobTable(rows).to_tensors())
    batch = {"chosen": torch.zeros(2, 4, dtype=torch.long), "sample_index": torch.tensor([3, 0])}
    expected = torch.tensor([[-1.0, -2, 0], [-4, 0, 0], [-3, 0, 0], [0, 0, 0]])
    assert torch.equal(table.lookup(batch), expected)
    with pytest.raises(KeyError, match="sample 7"):
        table.lookup({"chosen": torch.zeros(1, 4, dtype=torch.long), "sample_index": torch.tensor([7])})


def test_training_job_precomputes_into_its_log_dir_and_reuses(dist_pool, tmp_path):
    from training_workers import train_job

    lines = [json.dumps({"prompt": f"Question {i}: what is {i} plus {i}?", "chosen_response": f" It is {2 * i}.",
                         "rejected_response": f" Maybe {i + 3}, or so."}) for i in range(12)]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "val.jsonl").write_text("\n".join(lines[:6]) + "\n")
    job = ["model.micro_batch_size=2", "model.global_batch_size=4", "trainer.dpo.max_steps=3",
           "trainer.dpo.val_check_interval=3", "exp_manager.create_checkpoint_callback=False",
           f"model.data.data_prefix.train={tmp_path / 'train.jsonl'}",
           f"model.data.data_prefix.validation={tmp_path / 'val.jsonl'}", "model.dpo.precompute_ref_log_probs=True"]
    first = dist_pool.run(1, train_job, str(tmp_path / "first"), job)[0]
    files = sorted((tmp_path / "first" / "ref_log_probs").glob("*.safetensors"))
    assert [f.name.split("-")[0] for f in files] == ["train", "validation"]
    assert series_of(first, "train/loss")[0] == LN2_FP32
    stamps = [f.stat().st_mtime_ns for f in files]
    shared = f"model.dpo.ref_log_probs_cache_dir={tmp_path / 'first' / 'ref_log_probs'}"
    second = dist_pool.run(1, train_job, str(tmp_path / "second"), [*job, shared])[0]
    assert [f.stat().st_mtime_ns for f in files] == stamps  # read, not rewritten
    assert not (tmp_path / "second" / "ref_log_probs").exists()
    assert series_of(second, "train/loss") == series_of(first, "train/loss")


def series_of(records, key):
    return [r[key] for r in records if key in r]
