"""Greedy generation at TP=1, TP=2 and PP=2 equals transformers' greedy decoding of the same weights."""

import pytest
import torch

from generation_workers import default_model_greedy, sharded_argmax
from nemo_dpo.checkpoint.pretrained import DEFAULT_MODEL_DIR
from nemo_dpo.data.tokenizer import load_tokenizer
from test_hf_checkpoint import run_export_cli

MAX_NEW = 5


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(DEFAULT_MODEL_DIR / "tokenizer")


@pytest.fixture(scope="module")
def prompts(tokenizer):
    """Prompts of different lengths (right padding must not matter), one of them not in the chat format."""
    questions = ["3+4", "17+25", "99+99", "5+60", "1+1"]
    chat = [tokenizer.text_to_ids(tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                                                add_generation_prompt=True)) for q in questions]
    return chat + [tokenizer.text_to_ids("12+")]


@pytest.fixture(scope="module")
def transformers_greedy(dist_pool, tmp_path_factory, prompts, tokenizer):
    """Each prompt continued by argmax of a full transformers forward per token, up to eos (independent code)."""
    transformers = pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("hf") / "default_hf"
    dist_pool.run(1, run_export_cli, ["--checkpoint", str(DEFAULT_MODEL_DIR), "--out", str(out)])
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    continuations = []
    for prompt in prompts:
        ids = list(prompt)
        with torch.no_grad():
            while len(ids) - len(prompt) < MAX_NEW and (len(ids) == len(prompt) or ids[-1] != tokenizer.eos_id):
                logits = model(torch.tensor([ids])).logits[0, -1, : tokenizer.vocab_size]
                ids.append(int(logits.argmax()))
        continuations.append(ids[len(prompt):])
    return continuations


@pytest.mark.parametrize("tp,pp,sp", [(1, 1, False), (2, 1, True), (1, 2, False)], ids=["tp1", "tp2-sp", "pp2"])
def test_greedy_matches_transformers(dist_pool, prompts, tokenizer, transformers_greedy, tp, pp, sp):
    # batch_size 4: two batches, the second shorter.
    results = dist_pool.run(tp * pp, default_model_greedy, tp, pp, prompts, MAX_NEW, [tokenizer.eos_id], sp, 4)
    assert all(result == transformers_greedy for result in results)  # the same on every rank
    # The supervised model adds, and drops the units carry as its demonstrations taught it ("17+25" -> "32").
    assert results[0][0] == tokenizer.text_to_ids("7\n") + [tokenizer.eos_id]
    assert results[0][1] == tokenizer.text_to_ids("32\n") + [tokenizer.eos_id]
    assert max(map(len, results[0])) == MAX_NEW  # the non-chat prompt runs to the limit


@pytest.mark.parametrize("tp", [1, 2])
def test_vocab_parallel_argmax_ties_and_padding(dist_pool, tp):
    # Row 0: a tie across the two shards (ids 1 and 2) goes to the lowest id; id 3 is vocabulary padding.
    # Row 1: the largest real logit lies in the second shard.
    logits = torch.tensor([[0.0, 5.0, 5.0, 9.0], [1.0, 0.0, 4.0, 7.0]])
    assert dist_pool.run(tp, sharded_argmax, logits, 3) == [[1, 2]] * tp
