"""Hugging Face TRL's preference layouts from JSONL, Parquet and datasets folders: NeMo Aligner's tokens."""

import importlib
import json
import math
from pathlib import Path

import pytest

import nemo_dpo
from nemo_dpo.data import FieldNames, RecordFormat, load_preference_records
from nemo_dpo.data.preference_dataset import DPOModelDataset
from nemo_dpo.data.records import PreferenceDataError
from nemo_dpo.data.tokenizer import load_tokenizer
from test_train_gpt_dpo import run_in_pool, series

datasets = pytest.importorskip("datasets")
pyarrow_parquet = pytest.importorskip("pyarrow.parquet")

ASSETS = Path(nemo_dpo.__file__).resolve().parent / "assets"
SYSTEM = {"role": "system", "content": "Answer with the sum."}


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def default_pairs(count: int) -> list[tuple[list, str, str]]:
    """(prompt messages, chosen, rejected) of the embedded default data, plus a multi-turn one."""
    lines = (ASSETS / "default_data" / "train.jsonl").read_text().splitlines()[:count]
    pairs = [(r["prompt"], r["chosen_response"], r["rejected_response"]) for r in map(json.loads, lines)]
    return pairs + [([SYSTEM, user("1+1"), assistant("2\n"), user("2+2")], "4\n", "5\n")]


PAIRS = default_pairs(6)


def nemo_rows(string_prompts: bool, tokenizer) -> list[dict]:
    """The pairs in NeMo Aligner's layout: message prompts, or the same prompts rendered to text."""
    return [{"prompt": tokenizer.apply_chat_template(p, add_generation_prompt=True) if string_prompts else p,
             "chosen_response": c, "rejected_response": r} for p, c, r in PAIRS]


def trl_rows(form: str, tokenizer) -> list[dict]:
    if form == "strings":
        return [{"prompt": tokenizer.apply_chat_template(p, add_generation_prompt=True), "chosen": c, "rejected": r}
                for p, c, r in PAIRS]
    if form == "messages":
        return [{"prompt": p, "chosen": [assistant(c)], "rejected": [assistant(r)]} for p, c, r in PAIRS]
    assert form == "implicit"
    return [{"chosen": p + [assistant(c)], "rejected": p + [assistant(r)]} for p, c, r in PAIRS]


def write(rows: list[dict], container: str, path: Path) -> Path:
    if container == "jsonl":
        path = path.with_suffix(".jsonl")
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif container == "parquet":
        path = path.with_suffix(".parquet")
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    else:
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ASSETS / "default_model" / "tokenizer")


def items(tokenizer, path=None, data=None, **data_cfg) -> list[dict]:
    dataset = DPOModelDataset({"data": data_cfg}, tokenizer, "train", path, None, data, 128, seed=0)
    return [{key: value.tolist() if hasattr(value, "tolist") else value for key, value in dataset[i].items()}
            for i in range(len(dataset))]


@pytest.mark.parametrize("container", ["jsonl", "parquet", "datasets"])
@pytest.mark.parametrize("form", ["strings", "messages", "implicit"])
def test_trl_layouts_give_nemo_aligners_token_ids(tokenizer, tmp_path, form, container):
    nemo = write(nemo_rows(form == "strings", tokenizer), "jsonl", tmp_path / "nemo")
    trl = write(trl_rows(form, tokenizer), container, tmp_path / f"trl_{form}")
    expected, got = items(tokenizer, nemo), items(tokenizer, trl)
    assert len(expected) == len(PAIRS) and got == expected
    # The multi-turn pair: the prompt ends after the last user turn; only the answer is labelled.
    answer = [t for t in got[-1]["chosen_labels"] if t != -100]
    assert answer == tokenizer.text_to_ids("4\n" if form == "strings" else "4\n\n")


def test_custom_field_names_with_rewards(tokenizer, tmp_path):
    rows = [{"question": p, "good": c, "bad": r, "good_score": 2.0 + i, "bad_score": -1.0}
            for i, (p, c, r) in enumerate(PAIRS)]
    nemo = [{**row, "chosen_reward": 2.0 + i, "rejected_reward": -1.0}
            for i, row in enumerate(nemo_rows(False, tokenizer))]
    names = {"prompt": "question", "chosen_response": "good", "rejected_response": "bad",
             "chosen_reward": "good_score", "rejected_reward": "bad_score"}
    got = items(tokenizer, write(rows, "parquet", tmp_path / "custom"), field_names=names)
    assert got == items(tokenizer, data=nemo)
    assert [item["chosen_reward"] for item in got] == [2.0 + i for i in range(len(PAIRS))]
    # In-memory rows are mapped too.
    assert items(tokenizer, data=rows, field_names=names) == got


def test_datasets_dict_folder_picks_the_split(tokenizer, tmp_path):
    rows = trl_rows("implicit", tokenizer)
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:3]),
                          "test": datasets.Dataset.from_list(rows[3:])}).save_to_disk(str(tmp_path / "dd"))
    assert len(load_preference_records(tmp_path / "dd", "train")) == 3
    assert len(load_preference_records(tmp_path / "dd", "test")) == len(rows) - 3
    with pytest.raises(PreferenceDataError, match=r"a DatasetDict without a 'validation' split \(it has train, test\)"):
        load_preference_records(tmp_path / "dd", "validation")


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": [user("1+1")], "chosen": [assistant("2")], "rejected": [assistant(" ")]}, "'rejected' is empty"),
        ({"prompt": [user("1+1")], "chosen": [user("2")], "rejected": [assistant("3")]},
         "'chosen' starts with role 'user'; a response must start with 'assistant'"),
        ({"prompt": "1+1=", "chosen": [assistant("2")], "rejected": [assistant("3")]},
         "'prompt' is a string but the responses are message lists"),
        ({"chosen": [user("1+1"), assistant("2")], "rejected": [user("1+2"), assistant("3")]},
         "they differ at message 1, 'chosen''s is role 'user'"),
        ({"chosen": [user("1+1"), assistant("2")], "rejected": [user("1+1")]},
         "'rejected' has no messages after the 1 it shares"),
        ({"chosen": "1+1=2", "rejected": "1+1=3"}, "missing key(s) 'prompt'"),
        ({"chosen": [], "rejected": []}, "'chosen' has no messages after the 0 it shares"),
        # Reward fields keep NeMo Aligner's names next to TRL's.
        ({"prompt": "1+1=", "chosen": "2", "rejected": "3", "chosen_reward": math.inf},
         "'chosen_reward' must be finite, got inf"),
        ({"prompt": [user("1+1")], "chosen": [assistant("2")], "rejected": [{"role": "bot", "content": "3"}]},
         "rejected message 1 has unknown role 'bot'"),
    ],
)
@pytest.mark.parametrize("container", ["jsonl", "parquet"])
def test_bad_rows_name_file_row_and_field(tmp_path, row, message, container):
    good = {"prompt": [user("1+1")], "chosen": [assistant("2")], "rejected": [assistant("3")]}
    # A Parquet column holds one type: a row shaped otherwise goes in a file of its own.
    same_shape = set(row) == set(good) and all(type(row[key]) is type(good[key]) for key in good)
    rows = [good, good, row] if container == "jsonl" or same_shape else [row]
    path = write(rows, container, tmp_path / "bad")
    where = f"{path}:{len(rows)}" if container == "jsonl" else f"{path}, row {len(rows) - 1}"
    with pytest.raises(PreferenceDataError) as err:
        load_preference_records(path, "train")
    assert str(err.value).startswith(f"{where}: ") and message in str(err.value), str(err.value)


def test_field_names_are_checked():
    with pytest.raises(ValueError, match="field_names: unknown key.s. chosen; valid: prompt, chosen_response"):
        FieldNames.from_config({"chosen": "a"})
    with pytest.raises(ValueError, match=r"model.data.field_names.rejected_response=None must be a field name$"):
        FieldNames.from_config({"rejected_response": None})
    assert FieldNames.from_config({"prompt": None}).prompt is None


def test_null_prompt_field_takes_the_shared_messages(tokenizer, tmp_path):
    """UltraFeedback-style rows: a string prompt column next to whole conversations."""
    rows = [{**row, "prompt": "ignored"} for row in trl_rows("implicit", tokenizer)]
    path = write(rows, "jsonl", tmp_path / "uf")
    with pytest.raises(PreferenceDataError, match="set model.data.field_names.prompt=null"):
        items(tokenizer, path)
    trl = {"prompt": None, "chosen_response": "chosen", "rejected_response": "rejected"}
    assert items(tokenizer, path, field_names=trl) == items(tokenizer, write(nemo_rows(False, tokenizer), "jsonl",
                                                                               tmp_path / "nemo"))


def test_detection_prefers_nemo_names_and_reports_trl(tmp_path, caplog):
    both = {"prompt": "p", "chosen_response": "a", "rejected_response": "b", "chosen": "x", "rejected": "y"}
    assert RecordFormat().to_record(both, "w")["chosen_response"] == "a"
    path = write([{"prompt": "p", "chosen": "x", "rejected": "y"}], "jsonl", tmp_path / "trl")
    caplog.set_level("INFO", logger="nemo_dpo.data.sources")
    assert load_preference_records(path, "train")[0]["chosen_response"] == "x"
    assert f"{path}: read with TRL's field names (prompt=prompt, chosen_response=chosen" in caplog.text


def test_missing_extra_is_named(tmp_path, monkeypatch):
    path = tmp_path / "x.parquet"
    path.write_bytes(b"PAR1")
    real = importlib.import_module

    def without_pyarrow(name, *args):
        if name.startswith("pyarrow"):
            raise ImportError(name)
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_pyarrow)
    with pytest.raises(ImportError, match=r"needs the optional dependency pyarrow: pip install 'nemo-dpo\[datasets\]'"):
        load_preference_records(path, "train")


def test_damaged_parquet_is_named(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(PreferenceDataError, match=f"{path}: not a readable Parquet file"):
        load_preference_records(path, "train")


def test_trl_data_trains(dist_pool, tmp_path, tokenizer):
    """A blend of TRL files (implicit-prompt JSONL, message-list Parquet, string datasets folder) trains."""
    pairs = [json.loads(line) for line in (ASSETS / "default_data" / "train.jsonl").read_text().splitlines()[:24]]
    rows = [(r["prompt"], r["chosen_response"], r["rejected_response"]) for r in pairs]
    implicit = write([{"chosen": p + [assistant(c)], "rejected": p + [assistant(r)]} for p, c, r in rows[:8]],
                     "jsonl", tmp_path / "implicit")
    messages = write([{"prompt": p, "chosen": [assistant(c)], "rejected": [assistant(r)]} for p, c, r in rows[8:16]],
                     "parquet", tmp_path / "messages")
    strings = write([{"prompt": tokenizer.apply_chat_template(p, add_generation_prompt=True), "chosen": c,
                      "rejected": r} for p, c, r in rows[16:]], "datasets", tmp_path / "strings")
    records = run_in_pool(
        dist_pool, tmp_path / "logs",
        f"model.data.data_prefix.train=[1,{implicit},1,{messages},1,{strings}]",
        f"model.data.data_prefix.validation={messages}",
        "trainer.dpo.max_steps=3", "trainer.dpo.val_check_interval=3", "model.global_batch_size=8",
        "model.micro_batch_size=8", "exp_manager.create_checkpoint_callback=False",
        "exp_manager.create_tensorboard_logger=False",
    )
    losses = series(records, "train/loss")
    assert len(losses) == 3 and losses[0] == pytest.approx(math.log(2)) and all(map(math.isfinite, losses))
    assert series(records, "val/loss")[-1] < math.log(2)


def test_field_names_with_packed_npy_are_refused():
    from omegaconf import OmegaConf

    from nemo_dpo.training.data import check_data_impl

    check_data_impl(OmegaConf.create({"data_impl": "packed_jsonl"}))
    with pytest.raises(ValueError, match="packed .npy files .data_impl=packed_jsonl. hold token ids"):
        check_data_impl(OmegaConf.create({"data_impl": "packed_jsonl", "field_names": {"prompt": "question"}}))


DOC = Path(__file__).resolve().parent.parent / "docs" / "data_formats.md"


def doc_blocks(language: str) -> list[tuple[str, str]]:
    """(info string after the language, body) of each ```<language> block of docs/data_formats.md."""
    import re

    return re.findall(rf"^```{language}([^\n]*)\n(.*?)^```$", DOC.read_text(), flags=re.M | re.S)


def test_doc_examples(tokenizer, tmp_path):
    """Every JSONL example of docs/data_formats.md reads, and all give the same tokens (one pair, many layouts)."""
    blocks = doc_blocks("jsonl")
    names = [info.split()[0] for info, _ in blocks]
    assert names == ["nemo-messages", "nemo-string", "trl-strings", "trl-messages", "trl-implicit", "custom-fields"]
    results = {}
    for info, body in blocks:
        name, _, setting = info.strip().partition(" ")
        path = tmp_path / f"{name}.jsonl"
        path.write_text(body)
        field_names = json.loads(setting.removeprefix("field_names=")) if setting else None
        results[name] = items(tokenizer, path, field_names=field_names)
    assert all(result == results["nemo-messages"] for result in results.values())
    answer = [t for t in results["nemo-messages"][0]["chosen_labels"] if t != -100]
    assert answer == tokenizer.text_to_ids("4\n")


def test_doc_commands(tmp_path, monkeypatch):
    """The page's Python snippet runs (on a local file, caching under tmp_path); its command's overrides compose."""
    from nemo_dpo.training import compose_config

    (python,) = [body for _, body in doc_blocks("python")]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    exec(compile(python, str(DOC), "exec"), {})
    assert load_preference_records(tmp_path / "pairs_ds", "train")[0]["chosen_response"] == "a"
    (bash,) = [body for _, body in doc_blocks("bash")]
    overrides = bash.replace("\\\n", " ").split()[2:]
    cfg = compose_config(overrides)
    assert dict(cfg.model.data.field_names) == {"prompt": "question", "chosen_response": "good",
                                                "rejected_response": "bad", "chosen_reward": "chosen_reward",
                                                "rejected_reward": "rejected_reward"}


def test_equal_conversations_are_dropped_as_identical_pairs(tokenizer):
    same = [user("1+1"), assistant("2\n")]
    rows = [{"chosen": same, "rejected": list(same)}, {"chosen": same, "rejected": [user("1+1"), assistant("3\n")]}]
    dataset = DPOModelDataset({"data": {}}, tokenizer, "train", None, None, rows, 64, seed=0)
    assert (len(dataset), dataset.num_identical, dataset.indices) == (1, 1, [1])
