"""Hostile and careless preference data: bad values named by file:line, bounded memory, no-signal pairs."""

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from test_data_tokenizer import make_tokenizer_dir

import nemo_dpo
from nemo_dpo.data.jsonl import load_jsonl
from nemo_dpo.data.preference_dataset import DPOModelDataset
from nemo_dpo.data.records import PreferenceDataError
from nemo_dpo.data.tokenizer import load_tokenizer
from nemo_dpo.training import build_dataset, compose_config

ASSETS = Path(nemo_dpo.__file__).resolve().parent / "assets"
DEFAULT_TOKENIZER = ASSETS / "default_model" / "tokenizer"
GOOD = b'{"prompt": "2+2=", "chosen_response": "4", "rejected_response": "5"}'


def pair(**extra) -> bytes:
    return json.dumps({"prompt": "2+2=", "chosen_response": "4", "rejected_response": "5", **extra}).encode()


def chat(messages, chosen="4") -> bytes:
    return json.dumps({"prompt": messages, "chosen_response": chosen, "rejected_response": "5"}).encode()


@pytest.fixture(scope="module")
def default_tokenizer():
    return load_tokenizer(DEFAULT_TOKENIZER)


@pytest.fixture(scope="module")
def bpe_tokenizer(tmp_path_factory):
    return load_tokenizer(make_tokenizer_dir(tmp_path_factory.mktemp("tok")))


def make_dataset(tokenizer, path=None, data=None, seq_length=64, **data_cfg):
    return DPOModelDataset({"data": data_cfg}, tokenizer, "train", path, None, data, seq_length, seed=0)


@pytest.mark.parametrize(
    "line, message",
    [
        (b'{"prompt": "p", "chosen_response": "a", "rejected_response": "b", "chosen_reward": NaN}',
         "'chosen_reward' must be finite, got nan"),
        (b'{"prompt": "p", "chosen_response": "a", "rejected_response": "b", "rejected_reward": -Infinity}',
         "'rejected_reward' must be finite, got -inf"),
        (b'{"prompt": "p", "chosen_response": "a", "rejected_response": "b", "chosen_reward": 1e400}',
         "'chosen_reward' must be finite, got inf"),
        (pair(chosen_reward=10**400), "'chosen_reward' must be finite"),
        (chat([{"role": "hacker", "content": "hi"}]),
         "prompt message 1 has unknown role 'hacker'; valid roles: system, user, assistant, tool"),
        (chat([{"role": "system", "content": "x"}, {"role": "User", "content": "hi"}]),
         "prompt message 2 has unknown role 'User'"),
        (chat([{"role": "user", "content": "hi"}], chosen={"role": "user", "content": "4"}),
         "'chosen_response' has role 'user'; a response must be 'assistant'"),
        (b'{"prompt": "p\xff", "chosen_response": "a", "rejected_response": "b"}',
         "invalid UTF-8 (byte 0xff at offset 13 of the line, 83 of the file)"),
        (b'{"prompt": "\\ud800", "chosen_response": "a", "rejected_response": "b"}',
         "'prompt' holds a lone UTF-16 surrogate"),
        (b"[" * 100_000, "malformed JSON (nested too deeply)"),
        (b'{"prompt": ' + b"1" * 5000 + b"}", "malformed JSON (Exceeds the limit"),
        (b'{"prompt": "p", "chosen_response": "a"', "malformed JSON"),
    ],
)
def test_bad_values_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(GOOD + b"\n\n" + line + b"\n" + GOOD + b"\n")
    with pytest.raises(PreferenceDataError) as err:
        load_jsonl(path)
    text = str(err.value)
    assert text.startswith(f"{path}:3: ") and message in text and "\n" not in text


@pytest.mark.parametrize(
    "make_path, error, message",
    [
        (lambda tmp: tmp, IsADirectoryError, "is a directory, not a preference JSONL file"),
        (lambda tmp: tmp / "nope.jsonl", FileNotFoundError, "preference data file not found"),
        (lambda tmp: Path("/dev/zero"), PreferenceDataError, "not a regular file"),
    ],
)
def test_bad_paths(tmp_path, default_tokenizer, make_path, error, message):
    with pytest.raises(error, match=message):
        make_dataset(default_tokenizer, make_path(tmp_path))


def test_good_roles_bom_and_crlf_are_read(tmp_path):
    roles = [{"role": r, "content": "x"} for r in ("system", "user", "assistant", "tool", "user")]
    path = tmp_path / "ok.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD + b"\r\n" + chat(roles) + b"\r\n")
    records = load_jsonl(path)
    assert len(records) == 2 and records[1]["prompt"] == roles


def test_line_bound_counts_characters_not_bytes(tmp_path):
    def line(chars: int, fill: str) -> bytes:
        text = json.dumps({"prompt": "p", "chosen_response": "a", "rejected_response": "b"}, ensure_ascii=False)
        return (text[:-1] + ', "x": "' + fill * (chars - len(text) - 9) + '"}').encode()

    lines = [line(400, "é"), line(401, "a"), line(400, "😀"), line(1000, "a")]
    assert [len(x.decode()) for x in lines] == [400, 401, 400, 1000] and len(lines[2]) > 1200
    path = tmp_path / "bound.jsonl"
    path.write_bytes(b"\n".join(lines))
    records = load_jsonl(path, max_record_chars=400)
    assert records.line_numbers == [1, 3] and records.too_long_lines == [2, 4]
    with pytest.raises(PreferenceDataError, match=r"no records \(1 line\(s\) longer than max_record_chars=400 "
                       rf"skipped, first at {path}:1\)"):
        path.write_bytes(lines[3])
        load_jsonl(path, max_record_chars=400)


def test_huge_line_is_skipped_and_reported(tmp_path, default_tokenizer, caplog):
    path = tmp_path / "huge.jsonl"
    path.write_bytes(b"\n".join([GOOD, pair(chosen_response="4" * 20_000_000), pair(rejected_response="6")]) + b"\n")
    with caplog.at_level(logging.WARNING):
        ds = make_dataset(default_tokenizer, path, seq_length=64)
    assert (len(ds), ds.num_too_long, ds.max_record_chars) == (2, 1, 64 * 64)
    assert ds.data.line_numbers == [1, 3]
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"1 skipped for exceeding cfg.data.max_record_chars=4096 (first at {path}:2)" in warning


def test_max_record_chars_key(tmp_path, default_tokenizer):
    long_record = {"prompt": "1+1=", "chosen_response": "2" * 600, "rejected_response": "3"}
    ds = make_dataset(default_tokenizer, data=[json.loads(GOOD), long_record], seq_length=8)
    assert (len(ds), ds.num_too_long, ds.num_dropped) == (1, 1, 0)  # 600 > 64 * 8: never tokenised
    raised = make_dataset(default_tokenizer, data=[json.loads(GOOD), long_record], seq_length=8, max_record_chars=700)
    assert (len(raised), raised.num_too_long, raised.num_dropped) == (1, 0, 1)  # tokenised, then over seq_length
    for bad in (0, -1, "big", True, 1.5):
        with pytest.raises(ValueError, match="cfg.data.max_record_chars must be a positive integer or null"):
            make_dataset(default_tokenizer, data=[json.loads(GOOD)], max_record_chars=bad)


def test_all_identical_pairs_refuse_to_train(default_tokenizer):
    same = {"prompt": "2+2=", "chosen_response": "4", "rejected_response": "4"}
    with pytest.raises(PreferenceDataError, match="train: no usable preference pairs of 40: "
                       "40 dropped for identical chosen and rejected tokens"):
        make_dataset(default_tokenizer, data=[same] * 40)


def test_identical_pairs_dropped_and_counted(default_tokenizer, caplog):
    records = [
        json.loads(GOOD),
        {"prompt": "2+2=", "chosen_response": "4", "rejected_response": "4"},
        {"prompt": "2+2=", "chosen_response": "é", "rejected_response": "ü"},  # both become <unk>
        {"prompt": "3+3=", "chosen_response": "6", "rejected_response": "7"},
        {"prompt": "1" * 70, "chosen_response": "2", "rejected_response": "3"},  # over seq_length
    ]
    with caplog.at_level(logging.WARNING):
        ds = make_dataset(default_tokenizer, data=records, seq_length=64)
    assert (len(ds), ds.num_identical, ds.num_dropped, ds.indices) == (2, 2, 1, [0, 3])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings[0] == (
        "train: of 5 preference pairs, 1 exceed seq_length=64: 1 dropped, 0 truncated "
        "(cfg.data.over_length_policy=drop); 2 dropped for identical chosen and rejected tokens"
    )


def test_truncation_that_makes_a_pair_identical_drops_it(bpe_tokenizer):
    prompt, same = " hello" * 4, " hello" * 5
    records = [
        {"prompt": prompt, "chosen_response": same + "a", "rejected_response": same + "p"},  # equal once cut
        {"prompt": prompt, "chosen_response": "a" + same, "rejected_response": "p" + same},  # differ after the cut
    ]
    assert len(bpe_tokenizer.text_to_ids(prompt)) == 4 and len(bpe_tokenizer.text_to_ids(same + "a")) == 6
    ds = make_dataset(bpe_tokenizer, data=records, seq_length=8, over_length_policy="truncate_response")
    assert (len(ds), ds.num_identical, ds.num_truncated, ds.indices) == (1, 1, 1, [1])


def test_unknown_characters_counted_once_with_first_line(tmp_path, default_tokenizer, caplog):
    path = tmp_path / "unk.jsonl"
    lines = [GOOD, pair(chosen_response="h\u00e9\u2603"), pair(rejected_response="\u00fc")]
    path.write_bytes(b"\n".join(lines) + b"\n")
    with caplog.at_level(logging.WARNING):
        ds = make_dataset(default_tokenizer, path)
    assert (len(ds), ds.num_unknown) == (3, 3)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"train: 3 token(s) of text the tokenizer cannot represent became its unknown token (first at {path}:2)"
    ]


def test_byte_level_tokenizer_has_no_unknown_text(bpe_tokenizer, caplog):
    with caplog.at_level(logging.WARNING):
        ds = make_dataset(bpe_tokenizer, data=[{"prompt": "p", "chosen_response": "\u2603", "rejected_response": "b"}])
    assert ds.num_unknown == 0 and not caplog.records


MEMORY_PROBE = """
import json, sys, tracemalloc
from nemo_dpo.data.preference_dataset import DPOModelDataset
from nemo_dpo.data.tokenizer import load_tokenizer

def kib(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))

tokenizer = load_tokenizer(sys.argv[1])
tokenizer.batch_text_to_ids(["warm up"])
with open("/proc/self/clear_refs", "w") as refs:
    refs.write("5")  # resets VmHWM, the peak RSS, to the current RSS (the imports' peak is higher)
rss = kib("VmRSS:")
tracemalloc.start()
ds = DPOModelDataset({"data": {}}, tokenizer, "train", sys.argv[2], None, None, 64, seed=0)
peak = tracemalloc.get_traced_memory()[1]
tracemalloc.stop()
print(json.dumps({"pairs": len(ds), "too_long": ds.num_too_long, "peak": peak, "rss_kib": kib("VmHWM:") - rss}))
"""


def test_memory_grows_with_kept_data_not_the_longest_line(tmp_path):
    lines = (ASSETS / "default_data" / "train.jsonl").read_bytes().splitlines()[:500]
    small, huge = tmp_path / "small.jsonl", tmp_path / "huge.jsonl"
    small.write_bytes(b"\n".join(lines) + b"\n")
    huge.write_bytes(b"\n".join(lines[:250] + [pair(chosen_response="4" * 20_000_000)] + lines[250:]) + b"\n")

    def probe(path):
        out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(DEFAULT_TOKENIZER), str(path)],
                             capture_output=True, text=True, check=True, cwd=Path(nemo_dpo.__file__).parent.parent)
        return json.loads(out.stdout.splitlines()[-1])

    without, with_line = probe(small), probe(huge)
    print(f"peak traced bytes: {without['peak']} without, {with_line['peak']} with a 20 MB line; "
          f"max RSS growth: {without['rss_kib']} KiB without, {with_line['rss_kib']} KiB with")
    assert (without["pairs"], with_line["pairs"], with_line["too_long"]) == (500, 500, 1)
    assert with_line["peak"] <= 1.3 * without["peak"]
    # RSS counts the tokenizer's own (Rust) memory too; a parsed 20 MB line alone would add 20 MB.
    assert with_line["rss_kib"] <= 1.3 * without["rss_kib"] + 4096


def test_yaml_key_reaches_the_dataset(tmp_path, default_tokenizer):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\n".join([GOOD, pair(chosen_response="4" * 200)]) + b"\n")
    overrides = [f"model.data.data_prefix.train={path}", "model.data.seq_length=64"]
    default = build_dataset(compose_config(overrides).model, default_tokenizer, "train")
    assert (default.max_record_chars, default.num_too_long, default.num_dropped) == (4096, 0, 1)
    bounded = build_dataset(compose_config(overrides + ["model.data.max_record_chars=100"]).model,
                            default_tokenizer, "train")
    assert (len(bounded), bounded.num_too_long, bounded.data.too_long_lines) == (1, 1, [2])
