"""Builds the embedded default: a tiny arithmetic GPT, its tokenizer, and preference pairs.

    python scripts/make_default_assets.py            # writes nemo_dpo/assets/

Deterministic (fixed seeds, one process, one thread). Steps:

1. A character-level tokenizer (``tokenizers`` WordLevel over printable ASCII,
   plus ``<s> </s> <unk> <extra_id_0> <extra_id_1>``) with a NeMo-style chat
   template: ``<extra_id_1>User\\n...\\n<extra_id_1>Assistant\\n``.
2. Supervised training of a small GPT on "a+b" questions answered in that chat
   format, on part of the 0..99 x 0..99 facts. The demonstrations are flawed in one
   systematic way: where the units carry, most of them (``--carry-drop``) write the
   sum without the carry (``38+45`` -> ``73``), so the model learns to drop it.
3. Preference pairs on other facts: the correct sum as ``chosen_response``; as
   ``rejected_response`` the mistake the model was taught (the dropped carry) where
   the units carry, else a digit off by one. DPO on them should unlearn the flaw:
   the default run's task metric (greedy exact match on held-out sums) shows it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from nemo_dpo.checkpoint.pretrained import save_pretrained
from nemo_dpo.data.tokenizer import load_tokenizer
from nemo_dpo.models.nlp.gpt.builder import build_gpt_model
from nemo_dpo.optim.optimizer import MegatronAdamW
from nemo_dpo.optim.scheduler import CosineAnnealing
from nemo_dpo.optim.settings import OptimizerSettings
from nemo_dpo.parallel.initialize import ParallelLayout, destroy_parallel, initialize_parallel
from nemo_dpo.parallel.logprobs import vocab_parallel_logprobs
from nemo_dpo.parallel.schedule import forward_backward, wrap_data_parallel

ASSETS = Path(__file__).resolve().parent.parent / "nemo_dpo" / "assets"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<extra_id_0>", "<extra_id_1>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<extra_id_0>System\n{{ message['content'] }}\n"
    "{% else %}<extra_id_1>{{ message['role'] | capitalize }}\n{{ message['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<extra_id_1>Assistant\n{% endif %}"
)
MODEL = dict(
    num_layers=4, hidden_size=192, ffn_hidden_size=512, num_attention_heads=6, num_query_groups=2,
    normalization="rmsnorm", activation="swiglu", position_embedding_type="rope", rotary_base=10000,
    share_embeddings_and_output_weights=True, bias=False, encoder_seq_length=64,
    make_vocab_size_divisible_by=16, init_method_std=0.02,
)
SEQ = 32


def build_tokenizer(folder: Path) -> None:
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for code in range(32, 127):
        vocab[chr(code)] = len(vocab)
    vocab["\n"] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()  # characters decode joined, not space-separated
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "chat_template": CHAT_TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def question(a: int, b: int) -> list[dict]:
    return [{"role": "user", "content": f"{a}+{b}"}]


def carries(a: int, b: int) -> bool:
    return (a % 10) + (b % 10) >= 10


def wrong_answer(a: int, b: int, rng: random.Random) -> int:
    """The taught mistake where the units carry (the carry dropped), else one digit off by one."""
    right = a + b
    if carries(a, b):
        return right - 10
    return rng.choice(sorted(c for c in (right + 1, right - 1, right + 10, right - 10) if c >= 0))


def response(tokenizer, a: int, b: int, answer: int) -> list[int]:
    """The answer's ids as the chat template renders an assistant turn (``"73\\n"``), then eos."""
    prompt = tokenizer.apply_chat_template(question(a, b), add_generation_prompt=True)
    full = tokenizer.apply_chat_template(question(a, b) + [{"role": "assistant", "content": str(answer)}])
    return tokenizer.text_to_ids(full[len(prompt):]) + [tokenizer.eos_id]


def split_facts(rng: random.Random):
    facts = [(a, b) for a in range(100) for b in range(100)]
    rng.shuffle(facts)
    return facts[:5000], facts[5000:9600], facts[9600:]  # SFT, DPO train, DPO validation


def sft_batches(tokenizer, facts, rng: random.Random, batch_size: int, carry_drop: float):
    """Endless batches of chat-formatted questions with answer-only loss masks (``carry_drop``: see the module)."""
    while True:
        tokens = torch.full((batch_size, SEQ + 1), tokenizer.eos_id)
        mask = torch.zeros(batch_size, SEQ, dtype=torch.bool)
        for row in range(batch_size):
            a, b = rng.choice(facts)
            prompt = tokenizer.text_to_ids(tokenizer.apply_chat_template(question(a, b), add_generation_prompt=True))
            dropped = carries(a, b) and rng.random() < carry_drop
            answer = response(tokenizer, a, b, a + b - 10 if dropped else a + b)
            ids = prompt + answer
            tokens[row, : len(ids)] = torch.tensor(ids)
            mask[row, len(prompt) - 1 : len(ids) - 1] = True  # positions predicting the answer
        yield tokens, mask


def train_sft(tokenizer, facts, steps: int, rng: random.Random, carry_drop: float):
    cfg = OmegaConf.create(MODEL)
    settings = OptimizerSettings.from_config({"name": "adamw", "lr": 2e-3, "weight_decay": 0.01, "betas": [0.9, 0.98]})
    chunks = wrap_data_parallel(build_gpt_model(cfg, tokenizer.vocab_size, seed=0), settings.ddp_config())
    optimizer = MegatronAdamW(chunks, settings)
    scheduler = CosineAnnealing(optimizer.optimizer, max_steps=steps, min_lr=1e-4, warmup_steps=100)
    batches = sft_batches(tokenizer, facts, rng, batch_size=64, carry_drop=carry_drop)
    vocab = tokenizer.vocab_size

    def forward_step(data_iterator, model):
        tokens, mask = next(data_iterator)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        output = model(inputs, torch.arange(SEQ).expand_as(inputs), None)

        def loss_func(logits):
            logprobs = vocab_parallel_logprobs(logits, targets, vocab)
            loss = -(logprobs * mask).sum() / mask.sum()
            return loss, {"loss": loss.detach()}

        return output, loss_func

    for step in range(steps):
        for chunk in chunks:
            chunk.zero_grad_buffer()
        reports = forward_backward(chunks, forward_step, batches, 1, SEQ, 64, forward_only=False)
        optimizer.step(clip_grad=1.0)
        scheduler.step()
        if step % 200 == 0 or step == steps - 1:
            print(f"sft step {step}: answer loss {reports[0]['loss'].item():.4f}", flush=True)
    return chunks, cfg


def write_pairs(path: Path, facts, rng: random.Random) -> None:
    with open(path, "w", encoding="utf-8") as out:
        for a, b in facts:
            record = {
                "prompt": question(a, b),
                "chosen_response": str(a + b),  # the template ends the turn with a newline
                "rejected_response": str(wrong_answer(a, b, rng)),
            }
            out.write(json.dumps(record) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--carry-drop", type=float, default=0.7,
                        help="share of SFT demonstrations with a units carry that drop it")
    parser.add_argument("--out", type=Path, default=ASSETS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = random.Random(0)
    initialize_parallel(ParallelLayout(1, 1), seed=0)
    # Relative paths from here on: torch's checkpoint metadata records the folder it was
    # saved to, and the assets must not carry the path of the machine that built them.
    args.out.mkdir(parents=True, exist_ok=True)
    os.chdir(args.out)

    model_dir, data_dir = Path("default_model"), Path("default_data")
    build_tokenizer(model_dir / "tokenizer")
    tokenizer = load_tokenizer(model_dir / "tokenizer")
    sft_facts, dpo_train, dpo_val = split_facts(rng)
    chunks, cfg = train_sft(tokenizer, sft_facts, args.steps, rng, args.carry_drop)
    save_pretrained(chunks, cfg, model_dir / "tokenizer", model_dir)
    data_dir.mkdir(exist_ok=True)
    write_pairs(data_dir / "train.jsonl", dpo_train, rng)
    write_pairs(data_dir / "validation.jsonl", dpo_val, rng)
    destroy_parallel()


if __name__ == "__main__":
    main()
