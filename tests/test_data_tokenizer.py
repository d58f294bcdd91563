"""HFTokenizer over a byte-level BPE tokenizer trained in the test (no downloads)."""

import json
import pickle

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from nemo_dpo.data.tokenizer import HFTokenizer, load_tokenizer, stage_tokenizer_dir, tokenizer_files_in

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<extra_id_0>", "<extra_id_1>"]
SPECIAL_TOKENS += ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
PAD, BOS, EOS = 0, 1, 2
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CORPUS = [
    "hello world, hello there. Which year was the Magna Carta signed? 1215",
    "Please give me the name of a famous medieval painter. Hieronymus Bosch David Hockney",
    "System User Assistant: say hello, I refuse to answer this question.",
]


def make_tokenizer_dir(folder, chat_template=CHAT_TEMPLATE):
    """Write tokenizer.json + tokenizer_config.json for a tiny byte-level BPE into ``folder``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 10, trainer)
    # A BOS-adding post-processor, as Llama tokenizers have: text_to_ids must not apply it.
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    # Saved truncation must not leak into text_to_ids.
    tok.enable_truncation(max_length=4)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": {"content": "</s>", "lstrip": False}, "pad_token": "<pad>"}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(make_tokenizer_dir(tmp_path_factory.mktemp("tok")))


def test_special_ids_and_vocab(tokenizer):
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (PAD, BOS, EOS)
    assert tokenizer.vocab_size == tokenizer.tokenizer.get_vocab_size(with_added_tokens=True) <= 400
    assert tokenizer.vocab_size > len(SPECIAL_TOKENS) + 256


def test_text_round_trip_without_bos_or_truncation(tokenizer):
    text = "hello world, Which year was the Magna Carta signed?\n<extra_id_1>"
    ids = tokenizer.text_to_ids(text)
    assert len(ids) > 4 and ids[0] != BOS
    assert ids[-1] == SPECIAL_TOKENS.index("<extra_id_1>")  # special tokens in text stay single tokens
    assert tokenizer.ids_to_text(ids) == text
    assert tokenizer.batch_text_to_ids([text, "hello"]) == [ids, tokenizer.text_to_ids("hello")]
    assert tokenizer.ids_to_text(ids, skip_special_tokens=True) == text.replace("<extra_id_1>", "")


def test_chat_template_renders(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    assert tokenizer.apply_chat_template(messages) == "<s><|system|>\nBe brief.<|end|>\n<|user|>\nhello<|end|>\n"
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=True).endswith("<|end|>\n<|assistant|>\n")


def test_missing_chat_template_is_a_clear_error(tmp_path):
    tok = load_tokenizer(make_tokenizer_dir(tmp_path, chat_template=None) / "tokenizer.json")
    assert tok.eos_id == EOS  # the config beside the file is still read
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_template_file_overrides_and_pickle(tmp_path):
    folder = make_tokenizer_dir(tmp_path, chat_template=None)
    (folder / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    tok = load_tokenizer(folder, eos_token="<|end|>")
    assert tok.eos_id == SPECIAL_TOKENS.index("<|end|>")
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert tok.apply_chat_template(messages) == "[a][b]"
    clone = pickle.loads(pickle.dumps(tok))  # DataLoader workers receive the tokenizer pickled
    assert clone.apply_chat_template([{"role": "user", "content": "c"}]) == "[c]"


def test_template_raise_exception(tmp_path):
    tok = HFTokenizer(
        Tokenizer.from_file(str(make_tokenizer_dir(tmp_path) / "tokenizer.json")),
        chat_template="{{ raise_exception('roles must alternate') }}",
    )
    assert tok.eos_id is None and tok.pad_id is None
    with pytest.raises(ValueError, match="roles must alternate"):
        tok.apply_chat_template([])


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer file"):
        load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="'<nope>' is not in the tokenizer's vocabulary"):
        load_tokenizer(make_tokenizer_dir(tmp_path), eos_token="<nope>")


def test_staged_tokenizer_folder_holds_only_tokenizer_files(tmp_path):
    source = make_tokenizer_dir(tmp_path / "model")
    (source / "model.safetensors").write_bytes(b"weights")
    files = tokenizer_files_in(source)
    assert sorted(files) == ["tokenizer.json", "tokenizer_config.json"]
    staged = stage_tokenizer_dir({**files, "chat_template.jinja": "{{ eos_token }}"})
    assert sorted(p.name for p in staged.iterdir()) == ["chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]
    assert (staged / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
    # tokenizer_config.json's template wins over chat_template.jinja.
    assert load_tokenizer(staged).chat_template == load_tokenizer(source).chat_template
