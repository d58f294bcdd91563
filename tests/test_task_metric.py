"""The default demo's task metric: answers (first lines) of greedy generations against chosen responses."""

from pathlib import Path

import pytest
import torch

import nemo_dpo
from nemo_dpo.data import DPOModelDataset
from nemo_dpo.data.tokenizer import load_tokenizer
from nemo_dpo.generation.task_metric import answer_ids, exact_match, line_end_ids, prompt_and_reference

ASSETS = Path(nemo_dpo.__file__).resolve().parent / "assets"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ASSETS / "default_model" / "tokenizer")


def ids(tokenizer, text):
    return tokenizer.text_to_ids(text)


def test_line_ends_are_newline_tokens_and_eos(tokenizer):
    assert line_end_ids(tokenizer) == {tokenizer.eos_id, *ids(tokenizer, "\n")}


def test_answer_is_the_first_line(tokenizer):
    ends = line_end_ids(tokenizer)
    assert answer_ids(ids(tokenizer, "121\n\n7"), ends) == ids(tokenizer, "121")
    assert answer_ids(ids(tokenizer, "12") + [tokenizer.eos_id, 5], ends) == ids(tokenizer, "12")
    assert answer_ids(ids(tokenizer, "\n121"), ends) == []


@pytest.mark.parametrize(
    "generated, reference, expected",
    [
        ("121\n", "121\n\n", True),            # the template's extra newline is not part of the answer
        ("121</s>", "121\n\n", True),          # eos ends an answer too
        ("121", "121\n", True),                # cut by max_new_tokens, complete answer
        ("12", "121\n", False),                # cut too early
        ("1210\n", "121\n", False),            # one digit too many
        (" 121 \n", "121\n", True),            # surrounding spaces are not compared
        ("111\n", "121\n", False),
        ("\n121\n", "121\n", False),           # an empty first line
    ],
)
def test_exact_match_cases(tokenizer, generated, reference, expected):
    ends = line_end_ids(tokenizer)

    def encode(text):
        return ids(tokenizer, text.replace("</s>", "")) + ([tokenizer.eos_id] if "</s>" in text else [])

    assert exact_match(encode(generated), encode(reference), tokenizer, ends) is expected


def test_prompt_and_reference_of_a_dataset_item(tokenizer):
    record = {"prompt": [{"role": "user", "content": "65+56"}], "chosen_response": "121\n",
              "rejected_response": "111\n"}
    dataset = DPOModelDataset(None, tokenizer, "v", None, None, [record], 64, 0)
    prompt, reference = prompt_and_reference(dataset[0])
    template = tokenizer.apply_chat_template(record["prompt"], add_generation_prompt=True)
    assert prompt == ids(tokenizer, template)
    assert reference == ids(tokenizer, "121\n\n")  # the chat template ends the turn with a newline
    assert isinstance(dataset[0]["chosen"], torch.Tensor)


def test_default_run_logs_the_task_metric_before_and_after(dist_pool, tmp_path):
    """Data-parallel (two ranks, each answering half the prompts) gives the one-process value, logged at both ends."""
    from generation_workers import default_task_exact_match
    from test_train_gpt_dpo import run_in_pool

    records = run_in_pool(
        dist_pool, tmp_path, "trainer.dpo.max_steps=2", "trainer.dpo.val_check_interval=2",
        "trainer.dpo.limit_val_batches=1", "model.data.task_eval.num_prompts=24", "model.data.task_eval.enabled=true",
        "exp_manager.create_checkpoint_callback=False", nproc=2,
    )
    task = [(r["step"], r["task/exact_match"]) for r in records if "task/exact_match" in r]
    assert [step for step, _ in task] == [0, 2]
    assert task[0][1] == dist_pool.run(1, default_task_exact_match, 24)[0]
    assert all(0 <= value <= 1 and value * 24 == round(value * 24) for _, value in task)


def test_task_eval_is_off_for_other_data_and_checked(tmp_path):
    from omegaconf import OmegaConf

    from nemo_dpo.training.task_eval import build_task_eval, check_task_eval

    (tmp_path / "t.jsonl").write_text("")
    data = {"data_prefix": {"train": str(tmp_path / "t.jsonl")}, "task_eval": {"enabled": None, "max_new_tokens": 8}}
    assert build_task_eval(OmegaConf.create({"data": data}), None, None, None, None) is None
    for key, value in (("max_new_tokens", 0), ("num_prompts", True), ("enabled", "yes")):
        with pytest.raises(ValueError, match=f"model.data.task_eval.{key}="):
            check_task_eval(OmegaConf.create({"task_eval": {"max_new_tokens": 8, key: value}}))
    with pytest.raises(ValueError, match="needs prompts: validation data or task_eval.data_prefix"):
        data["task_eval"]["enabled"] = True
        build_task_eval(OmegaConf.create({"data": data}), None, None, None, None)
