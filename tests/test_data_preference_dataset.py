"""DPOModelDataset and load_jsonl: token layout, labels, rewards, chat prompts, errors, over-length policy."""

import json
import logging

import pytest
import torch
from omegaconf import OmegaConf
from test_data_tokenizer import EOS, make_tokenizer_dir

from nemo_dpo.data.collate import dpo_custom_collate
from nemo_dpo.data.preference_dataset import DPOModelDataset, PreferenceDataError, load_jsonl
from nemo_dpo.data.samplers import MegatronPretrainingBatchSampler, build_dataloader
from nemo_dpo.data.tokenizer import load_tokenizer

# NeMo Aligner's documented extra_id format (docs/user-guide/dpo.rst).
EXTRA_ID_PROMPT = (
    "<extra_id_0>System\n\n<extra_id_1>User\nWhich year was the Magna Carta signed?\n<extra_id_1>Assistant\n"
)
EXTRA_ID_RECORD = {
    "prompt": EXTRA_ID_PROMPT,
    "chosen_response": "1215\n<extra_id_1>",
    "rejected_response": "I refuse to answer this question.\n<extra_id_1>",
}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(make_tokenizer_dir(tmp_path_factory.mktemp("tok")))


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def make_dataset(tokenizer, path=None, data=None, seq_length=256, name="train", **data_cfg):
    """A DPOModelDataset with ``cfg.data = data_cfg``."""
    cfg = {"data": data_cfg}
    return DPOModelDataset(cfg, tokenizer, name, path, None, data, seq_length, seed=1234)


def test_string_prompt_layout(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [EXTRA_ID_RECORD])
    item = make_dataset(tokenizer, path)[0]
    prompt = tokenizer.text_to_ids(EXTRA_ID_PROMPT)
    chosen = prompt + tokenizer.text_to_ids("1215\n<extra_id_1>")
    rejected = prompt + tokenizer.text_to_ids("I refuse to answer this question.\n<extra_id_1>")
    assert len(rejected) > len(chosen)
    assert (item["chosen_length"], item["rejected_length"]) == (len(chosen), len(rejected))
    # Both padded with eos to the longer of the pair; labels -100 on the prompt and the padding.
    pad = len(rejected) - len(chosen)
    assert item["chosen"].tolist() == chosen + [EOS] * pad
    assert item["rejected"].tolist() == rejected
    assert item["chosen_labels"].tolist() == [-100] * len(prompt) + chosen[len(prompt) :] + [-100] * pad
    assert item["rejected_labels"].tolist() == [-100] * len(prompt) + rejected[len(prompt) :]
    assert item["chosen"].dtype == item["chosen_labels"].dtype == torch.long
    assert tokenizer.ids_to_text([t for t in item["chosen_labels"].tolist() if t != -100]) == "1215\n<extra_id_1>"
    assert (item["chosen_reward"], item["rejected_reward"]) == (1.0, 0.0)


def test_append_eod(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [EXTRA_ID_RECORD])
    plain, with_eod = make_dataset(tokenizer, path)[0], make_dataset(tokenizer, path, append_eod=True)[0]
    assert with_eod["chosen_length"] == plain["chosen_length"] + 1
    assert with_eod["rejected"].tolist() == plain["rejected"].tolist() + [EOS]
    assert with_eod["rejected_labels"][-1] == EOS  # the model learns to stop
    assert with_eod["chosen_labels"][with_eod["chosen_length"] - 1] == EOS


def test_rewards_default_and_explicit(tokenizer, tmp_path):
    records = [EXTRA_ID_RECORD, {**EXTRA_ID_RECORD, "chosen_reward": 7, "rejected_reward": -2.5}]
    path = write_jsonl(tmp_path / "train.jsonl", records)
    # NeMo-style struct DictConfig: keys it lacks fall back to defaults.
    cfg = OmegaConf.create({"data": {"default_chosen_reward": 0.75, "default_rejected_reward": 0.25}})
    OmegaConf.set_struct(cfg, True)
    ds = DPOModelDataset(cfg, tokenizer, "train", path, None, None, 256, seed=0)
    assert (ds[0]["chosen_reward"], ds[0]["rejected_reward"]) == (0.75, 0.25)
    assert (ds[1]["chosen_reward"], ds[1]["rejected_reward"]) == (7.0, -2.5)


def test_prompt_and_response_tokenized_separately(tokenizer):
    # BPE would merge "hel" + "lo" into " hello" across the boundary, moving the split.
    record = {"prompt": "Assistant: say hel", "chosen_response": "lo", "rejected_response": "p"}
    joint = tokenizer.text_to_ids("Assistant: say hello")
    prompt = tokenizer.text_to_ids("Assistant: say hel")
    assert joint[: len(prompt)] != prompt  # the hazard is real for this tokenizer
    item = make_dataset(tokenizer, data=[record])[0]
    assert item["chosen"][: item["chosen_length"]].tolist() == prompt + tokenizer.text_to_ids("lo")
    assert (item["chosen_labels"] == -100).sum() == len(prompt)
    assert tokenizer.ids_to_text(item["chosen"][: item["chosen_length"]].tolist()) == "Assistant: say hello"


def test_message_list_prompt_uses_chat_template(tokenizer, tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Which year?"}]
    chosen = {"role": "assistant", "content": "1215"}
    records = [{"prompt": messages, "chosen_response": chosen, "rejected_response": "hello"}]
    item = make_dataset(tokenizer, write_jsonl(tmp_path / "chat.jsonl", records))[0]
    prompt_text = "<s><|system|>\nBe brief.<|end|>\n<|user|>\nWhich year?<|end|>\n<|assistant|>\n"
    prompt = tokenizer.text_to_ids(prompt_text)
    assert prompt[0] == tokenizer.bos_id  # the template's bos_token, not a post-processor
    # The response carries the template's end-of-turn marker.
    assert item["chosen"][: item["chosen_length"]].tolist() == prompt + tokenizer.text_to_ids("1215<|end|>\n")
    assert item["rejected"][: item["rejected_length"]].tolist() == prompt + tokenizer.text_to_ids("hello<|end|>\n")
    assert (item["rejected_labels"][: item["rejected_length"]] == -100).sum() == len(prompt)


def test_message_prompt_without_template_names_line(tmp_path):
    tok = load_tokenizer(make_tokenizer_dir(tmp_path / "tok", chat_template=None))
    record = {"prompt": [{"role": "user", "content": "hi"}], "chosen_response": "a", "rejected_response": "b"}
    path = write_jsonl(tmp_path / "chat.jsonl", ["", record])
    with pytest.raises(PreferenceDataError, match=r"chat\.jsonl:2: cannot render the chat template: .*no chat"):
        make_dataset(tok, path)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "p", "chosen_response": "a",', "malformed JSON"),
        ('{"prompt": "p", "chosen_response": "a"}', "missing key(s) 'rejected_response'"),
        ('{"chosen_response": "a", "rejected_response": "b"}', "missing key(s) 'prompt'"),
        ('{"prompt": "p", "chosen_response": "  ", "rejected_response": "b"}', "'chosen_response' is empty"),
        ('{"prompt": "p", "chosen_response": "a", "rejected_response": ""}', "'rejected_response' is empty"),
        ('{"prompt": "p", "chosen_response": "a", "rejected_response": "b", "chosen_reward": "x"}', "be a number"),
        ('{"prompt": [], "chosen_response": "a", "rejected_response": "b"}', "OpenAI-style messages"),
        ('{"prompt": 3, "chosen_response": "a", "rejected_response": "b"}', "must be a string or a list"),
        ('["p", "a", "b"]', "expected a JSON object"),
    ],
)
def test_load_jsonl_errors_name_file_and_line(tmp_path, line, message):
    good = json.dumps(EXTRA_ID_RECORD)
    path = write_jsonl(tmp_path / "bad.jsonl", [good, "", line, good])
    with pytest.raises(PreferenceDataError) as err:
        load_jsonl(path)
    assert f"{path}:3: " in str(err.value) and message in str(err.value)


def test_load_jsonl_missing_file_and_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(PreferenceDataError, match="empty.jsonl: no records"):
        load_jsonl(write_jsonl(tmp_path / "empty.jsonl", [""]))
    records = load_jsonl(write_jsonl(tmp_path / "ok.jsonl", ["", EXTRA_ID_RECORD, "", EXTRA_ID_RECORD]))
    assert len(records) == 2 and records.line_numbers == [2, 4]


def test_in_memory_records_are_validated(tokenizer):
    with pytest.raises(PreferenceDataError, match="valid, record 1: 'chosen_response' is empty"):
        make_dataset(tokenizer, data=[EXTRA_ID_RECORD, {**EXTRA_ID_RECORD, "chosen_response": ""}], name="valid")


def over_length_records(tokenizer):
    """Prompt of 4 tokens; responses of 1, 4 and 12 tokens; then a 12-token prompt."""
    short, other, long_ = "hello", "a", " hello" * 12  # "a": one token, so no pair is chosen == rejected
    records = [
        {"prompt": " hello" * 4, "chosen_response": short, "rejected_response": other},
        {"prompt": " hello" * 4, "chosen_response": " hello" * 4, "rejected_response": short},
        {"prompt": " hello" * 4, "chosen_response": short, "rejected_response": long_},
        {"prompt": long_, "chosen_response": short, "rejected_response": other},
    ]
    assert [len(tokenizer.text_to_ids(r["prompt"] + r["rejected_response"])) for r in records] == [5, 5, 16, 13]
    return records


def test_over_length_drop(tokenizer, caplog):
    with caplog.at_level(logging.WARNING):
        ds = make_dataset(tokenizer, data=over_length_records(tokenizer), seq_length=8)
    assert (len(ds), ds.num_dropped, ds.num_truncated) == (2, 2, 0)
    assert ds.indices == [0, 1]  # the index mapping skips dropped pairs
    assert ds[1]["chosen_length"] == 8
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "2 dropped" in warnings[0].getMessage()


def test_over_length_truncate_response(tokenizer):
    records = over_length_records(tokenizer)
    ds = make_dataset(tokenizer, data=records, seq_length=8, append_eod=True, over_length_policy="truncate_response")
    # Pair 1 grows to 9 with eos and is cut; pair 3's prompt leaves no room for a response: dropped.
    assert (len(ds), ds.num_dropped, ds.num_truncated) == (3, 1, 2)
    assert ds.indices == [0, 1, 2]
    cut = ds[2]
    assert cut["rejected_length"] == 8 and cut["rejected"][-1] != EOS  # a cut response does not end in eos
    assert (cut["rejected_labels"] != -100).sum() == 4
    assert cut["chosen"][: cut["chosen_length"]].tolist()[-1] == EOS  # the untouched side keeps its eos


def test_over_length_errors(tokenizer):
    with pytest.raises(ValueError, match="over_length_policy"):
        make_dataset(tokenizer, data=[EXTRA_ID_RECORD], over_length_policy="truncate")
    with pytest.raises(PreferenceDataError, match="no usable preference pairs"):
        make_dataset(tokenizer, data=[EXTRA_ID_RECORD], seq_length=4)


def test_documents_select_records_and_negative_index(tokenizer):
    records = [{**EXTRA_ID_RECORD, "chosen_reward": float(i)} for i in range(4)]
    ds = DPOModelDataset({"data": {}}, tokenizer, "train", None, [3, 1], records, 256, seed=0)
    assert len(ds) == 2 and [ds[i]["chosen_reward"] for i in range(2)] == [3.0, 1.0]
    with pytest.raises(IndexError, match="padding markers"):
        ds[-1]


def test_dataset_through_loader_and_collate(tokenizer, tmp_path):
    records = [{**EXTRA_ID_RECORD, "chosen_reward": float(i)} for i in range(3)]
    ds = make_dataset(tokenizer, write_jsonl(tmp_path / "valid.jsonl", records), name="validation", append_eod=True)
    loader = build_dataloader(ds, MegatronPretrainingBatchSampler(len(ds), 0, 1, 2, 0, 1))
    batches = [dpo_custom_collate(items, eos_id=tokenizer.eos_id, pad_length_to_multiple_of=8) for items in loader]
    assert [b["sample_mask"].tolist() for b in batches] == [[1.0, 1.0], [1.0, 0.0]]
    assert [b["chosen_rewards"].tolist() for b in batches] == [[0.0, 1.0], [2.0, 0.0]]
    last = batches[-1]
    assert last["chosen"].shape[1] % 8 == 0
    assert torch.equal(last["chosen"][0, : len(ds[2]["chosen"])], ds[2]["chosen"])
    assert (last["chosen"][0, last["chosen_length"][0] - 1 :] == EOS).all()
