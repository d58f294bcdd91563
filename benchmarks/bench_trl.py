"""nemo-dpo against Hugging Face TRL's ``DPOTrainer``, side by side on the same model, data and batch.

Both trainers run, one after the other and each in its own process, on the same
Hugging Face model folder and the same preference pairs (same token ids, checked),
global batch 16 pairs, fp32 on CPU, the same torch thread count and the same
number of steps; runs alternate (nemo-dpo, TRL, nemo-dpo, TRL, ...). Reported per
trainer: pairs/s and non-padding tokens/s over the measured steps (warm-up steps
and one-off passes such as the reference precompute are left out), the padding
fraction of the tokens the training forward computes, the process's peak RSS, and
the ratios nemo-dpo / TRL. Two modes: each trainer's defaults, and precomputed
reference log-probs on both sides (TRL's ``precompute_ref_log_probs=True``, ours
``model.dpo.precompute_ref_log_probs=true``).

Nothing is installed into the project: TRL runs from its own virtual environment,
named by ``--trl-python``. Make it once (CPU build of torch, outside the repository):

    python3 -m venv ~/trl-venv
    ~/trl-venv/bin/pip install torch==2.13.0     # the CPU build on a machine without CUDA
    ~/trl-venv/bin/pip install trl==1.16.0       # pulls transformers, accelerate, datasets

Then, from the repository root with the project's environment active:

    python benchmarks/bench_trl.py --trl-python ~/trl-venv/bin/python
    python benchmarks/bench_trl.py --trl-python ~/trl-venv/bin/python \\
        --ours-override model.data.packing=true --label packing

``--ours-override`` (repeatable) passes Hydra overrides to nemo-dpo's run, so any
of its options can be compared; ``--trl-arg key=value`` sets a ``DPOConfig``
field on the TRL side (value as JSON, e.g. ``gradient_checkpointing=false``).
The set-up is written into a temporary folder removed at exit (or ``--work-dir``).
``--setup tiny-llama`` (the default), deterministically: a ``tokenizers``
word-level tokenizer of 2,048 entries, a ``LlamaConfig`` model (hidden 256, 4
layers, 8 heads, 4 key-value heads, FFN 768, untied output) saved with
``save_pretrained`` as safetensors, and the pairs as JSONL twice: NeMo Aligner's
``prompt``/``chosen_response``/``rejected_response`` for nemo-dpo and
``prompt``/``chosen``/``rejected`` for TRL (prompts 20-120 tokens, responses
10-200 tokens plus the eos both trainers append). ``--setup default``: the
embedded default model exported to a Hugging Face folder, and its data.

Prints a table and writes ``benchmarks/results/bench_trl[-LABEL].json`` (``--output``).
Method and numbers: benchmarks/RESULTS.md, "nemo-dpo vs TRL".

This one file is also each run's worker (``_worker ours|trl``, started by the
benchmark with the right interpreter): at module level it imports the standard
library only, so the TRL environment needs nothing from this project.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import random
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
DEFAULT_ASSETS = REPO_ROOT / "nemo_dpo" / "assets"
GLOBAL_BATCH_PAIRS = 16
SEQ_LENGTH = 512  # tiny Llama: longest pair 120 + 200 + eos = 321 tokens; nothing is truncated on either side
SEED = 1234
LEARNING_RATE = 1e-5
BETA = 0.1  # TRL's beta, our ref_policy_kl_penalty
MODES = {
    "default": dict(ours=[], trl={}),
    "precompute": dict(ours=["model.dpo.precompute_ref_log_probs=true"], trl={"precompute_ref_log_probs": True}),
}

# The tiny Llama set-up.
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
VOCAB_SIZE = 2048
PROMPT_TOKENS = (20, 120)
RESPONSE_TOKENS = (10, 200)
LLAMA = dict(vocab_size=VOCAB_SIZE, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=SEQ_LENGTH,
             rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=3)


# --------------------------------------------------------------------------- set-up
def write_tiny_llama(folder: Path, num_pairs: int) -> dict:
    """The tiny Llama folder (model + tokenizer) and both JSONL files; returns their description.

    Every token is a whitespace-separated word of a word-level vocabulary, so a text
    of n words is n tokens for both trainers, whether prompt and response are
    tokenised apart (nemo-dpo) or together (TRL). Words are drawn Zipf-like.
    """
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM

    model_dir = folder / "tiny_llama"
    model_dir.mkdir(parents=True)
    words = [f"w{i}" for i in range(len(SPECIAL_TOKENS), VOCAB_SIZE)]
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    # Added tokens are matched before pre-tokenisation: TRL appends "</s>" to the response text.
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer.save(str(model_dir / "tokenizer.json"))
    # tokenizer_class pins transformers to the file as written (a Llama class would add a BOS).
    (model_dir / "tokenizer_config.json").write_text(json.dumps(dict(
        tokenizer_class="PreTrainedTokenizerFast", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>", model_max_length=SEQ_LENGTH), indent=1))

    torch.manual_seed(SEED)
    config = LlamaConfig(**LLAMA)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(model_dir)  # safetensors
    params = sum(p.numel() for p in model.parameters())

    rng = random.Random(SEED)
    weights = [1.0 / (rank + 1) for rank in range(len(words))]

    def text(low_high: tuple[int, int]) -> str:
        return " ".join(rng.choices(words, weights, k=rng.randint(*low_high)))

    ours, trl = [], []
    for _ in range(num_pairs):
        prompt = text(PROMPT_TOKENS) + "\n"
        chosen, rejected = text(RESPONSE_TOKENS), text(RESPONSE_TOKENS)
        ours.append(dict(prompt=prompt, chosen_response=chosen, rejected_response=rejected))
        trl.append(dict(prompt=prompt, chosen=chosen, rejected=rejected))
    write_jsonl(folder / "ours.jsonl", ours)
    write_jsonl(folder / "trl.jsonl", trl)
    # TRL appends eos to plain-text responses; ours does with append_eod.
    return dict(name="tiny-llama", model_dir=str(model_dir), ours_data=str(folder / "ours.jsonl"),
                trl_data=str(folder / "trl.jsonl"), seq_length=SEQ_LENGTH, append_eod=True, pairs=num_pairs,
                parameters=params, model={k: v for k, v in LLAMA.items() if not k.endswith("token_id")},
                tokenizer=f"word-level, {VOCAB_SIZE} entries", prompt_tokens=PROMPT_TOKENS,
                response_tokens=RESPONSE_TOKENS)


def write_embedded_default(folder: Path, num_pairs: int, ours_python: str, env: dict) -> dict:
    """The embedded default model exported to a Hugging Face folder, and its first training pairs.

    The pairs are conversations (a user message, assistant answers): both trainers
    render them with the tokenizer's chat template and neither appends an eos.
    """
    model_dir = folder / "default_model_hf"
    export = subprocess.run(
        [ours_python, "-m", "nemo_dpo.interop.export_cli", "--checkpoint", str(DEFAULT_ASSETS / "default_model"),
         "--out", str(model_dir)], env=env, capture_output=True, text=True)
    if export.returncode != 0:
        raise RuntimeError(f"exporting the embedded default model failed:\n{export.stderr[-3000:]}")
    config_file = model_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    # Without a class transformers would pick the model type's (Llama's), which adds a BOS.
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    config_file.write_text(json.dumps(config, indent=1))
    with open(DEFAULT_ASSETS / "default_data" / "train.jsonl", encoding="utf-8") as data:
        ours = [json.loads(line) for line, _ in zip(data, range(num_pairs))]
    if len(ours) < num_pairs:
        raise ValueError(f"the embedded default data holds {len(ours)} pairs, fewer than the {num_pairs} needed")
    trl = [dict(prompt=record["prompt"], **{side: [{"role": "assistant", "content": record[f"{side}_response"]}]
                                            for side in ("chosen", "rejected")}) for record in ours]
    write_jsonl(folder / "ours.jsonl", ours)
    write_jsonl(folder / "trl.jsonl", trl)
    hf_config = json.loads((model_dir / "config.json").read_text())
    return dict(name="default", model_dir=str(model_dir), ours_data=str(folder / "ours.jsonl"),
                trl_data=str(folder / "trl.jsonl"), seq_length=hf_config["max_position_embeddings"],
                append_eod=False, pairs=num_pairs,
                model={k: hf_config[k] for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                  "num_hidden_layers", "num_attention_heads",
                                                  "num_key_value_heads", "tie_word_embeddings")},
                tokenizer="the embedded character-level tokenizer and its chat template")


def write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as out:
        out.writelines(json.dumps(record) + "\n" for record in records)


# --------------------------------------------------------------------------- workers
def pair_digest(chosen: list[int], rejected: list[int]) -> str:
    """One pair's token ids (prompt + response + eos, both sides), as a short hash."""
    return hashlib.sha256(json.dumps([list(map(int, chosen)), list(map(int, rejected))]).encode()).hexdigest()[:16]


class StepClock:
    """Wall time and token counters at the end of every training step.

    ``pair_tokens``: prompt + response tokens of both sequences of each pair the
    step trained on (the prompt counted twice, as both trainers feed it twice by
    default); ``min_tokens``: the fewest tokens the training forward must compute
    for them (less than ``pair_tokens`` when a prompt is computed once);
    ``computed``: tokens the training forward was fed (rows x width, padding
    included). Only forwards with autograd on count: the reference forward runs
    on the same layout, and a precompute pass is not a step.
    """

    def __init__(self):
        self.counts = dict(pairs=0, pair_tokens=0, min_tokens=0, computed=0)
        self.steps: list[dict] = []

    def add(self, **counts: int) -> None:
        for key, value in counts.items():
            self.counts[key] += int(value)

    def count_forward(self, input_ids) -> None:
        import torch

        if torch.is_grad_enabled():
            self.add(computed=input_ids.numel())

    def step_end(self) -> None:
        self.steps.append(dict(time=time.perf_counter(), **self.counts))
        self.counts = dict.fromkeys(self.counts, 0)

    def result(self, **extra) -> dict:
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
        return dict(steps=self.steps, peak_rss_bytes=peak_rss, **extra)


def run_ours(spec: dict) -> dict:
    """One nemo-dpo training run (``nemo_dpo.training.train``), instrumented from outside the library."""
    import torch

    torch.set_num_threads(spec["threads"])
    import nemo_dpo.training.run as run
    from nemo_dpo.training.config import compose_config

    clock = StepClock()
    datasets = []
    build_dataset, build_trainer = run.build_dataset, run.build_trainer

    def recording_build_dataset(model_cfg, tokenizer, split):
        dataset = build_dataset(model_cfg, tokenizer, split)
        if split == "train":
            datasets.append(dataset)
        return dataset

    def instrumented_build_trainer(cfg, model, *args, **kwargs):
        trainer = build_trainer(cfg, model, *args, **kwargs)
        shared_prompt = bool(cfg.model.data.get("shared_prompt", False))
        augment, log_metrics = trainer.augment_dataloader, trainer.logger.log_metrics

        def counting_augment(dataloader):
            for batch in augment(dataloader):
                if dataloader is trainer.train_dataloader:
                    lengths = batch["chosen_length"] + batch["rejected_length"]
                    # The prompt is where the labels start: -100 before it.
                    prompts = (batch["chosen_labels"] != -100).int().argmax(dim=1)
                    clock.add(pairs=len(lengths), pair_tokens=lengths.sum(),
                              min_tokens=lengths.sum() - (prompts.sum() if shared_prompt else 0))
                yield batch

        def timed_log_metrics(metrics, step, prefix=""):
            if prefix == "train/":
                clock.step_end()
            log_metrics(metrics, step, prefix)

        trainer.augment_dataloader, trainer.logger.log_metrics = counting_augment, timed_log_metrics
        for chunk in model.model:  # the schedule calls chunk(tokens, positions, mask)
            chunk.register_forward_pre_hook(lambda module, args: clock.count_forward(args[0]))
        return trainer

    run.build_dataset, run.build_trainer = recording_build_dataset, instrumented_build_trainer
    cfg = compose_config(spec["overrides"])
    run.train(cfg)
    (dataset,) = datasets
    digests = []
    for i in range(len(dataset)):
        item = dataset[i]
        digests.append(pair_digest(item["chosen"][: item["chosen_length"]].tolist(),
                                   item["rejected"][: item["rejected_length"]].tolist()))
    import megatron.core

    return clock.result(pair_digests=sorted(digests), versions=dict(
        torch=torch.__version__, megatron_core=megatron.core.__version__), threads=torch.get_num_threads())


def run_trl(spec: dict) -> dict:
    """One TRL ``DPOTrainer`` run, in TRL's own environment."""
    import torch

    torch.set_num_threads(spec["threads"])
    import datasets
    import transformers
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    clock = StepClock()
    model_dir = spec["model_dir"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = datasets.load_dataset("json", data_files=spec["data"], split="train")
    micro = spec["micro_batch_size"]
    config = trl.DPOConfig(**{
        "output_dir": spec["output_dir"], "per_device_train_batch_size": micro,
        "gradient_accumulation_steps": GLOBAL_BATCH_PAIRS // micro, "max_steps": spec["steps"],
        "max_length": spec["max_length"], "learning_rate": LEARNING_RATE, "beta": BETA, "seed": SEED,
        "use_cpu": True, "bf16": False, "fp16": False, "report_to": "none", "save_strategy": "no",
        "eval_strategy": "no", "dataloader_num_workers": 0, "disable_tqdm": True, **spec["trl_args"],
    })

    class StepEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.step_end()

    trainer = trl.DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                             callbacks=[StepEnd()])

    def count(module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if torch.is_grad_enabled():
            mask = kwargs.get("attention_mask")
            real = input_ids.numel() if mask is None else int(mask.sum())
            # TRL feeds [chosen rows; rejected rows]: half the rows are pairs.
            clock.add(pairs=input_ids.shape[0] // 2, pair_tokens=real, min_tokens=real)
            clock.count_forward(input_ids)

    trainer.model.register_forward_pre_hook(count, with_kwargs=True)
    trainer.train()
    digests = sorted(pair_digest(row["prompt_ids"] + row["chosen_ids"], row["prompt_ids"] + row["rejected_ids"])
                     for row in trainer.train_dataset)
    return clock.result(pair_digests=digests, threads=torch.get_num_threads(), versions=dict(
        torch=torch.__version__, trl=trl.__version__, transformers=transformers.__version__,
        datasets=datasets.__version__), config={k: getattr(config, k) for k in (
            "per_device_train_batch_size", "gradient_accumulation_steps", "precompute_ref_log_probs",
            "padding_free", "gradient_checkpointing", "max_length", "optim", "torch_compile")})


def worker_main(side: str, spec_file: str, result_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    result = (run_ours if side == "ours" else run_trl)(spec)
    Path(result_file).write_text(json.dumps(result))


# --------------------------------------------------------------------------- driver
def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trl-python", required=True, help="python of the virtual environment TRL is installed in")
    parser.add_argument("--ours-python", default=sys.executable,
                        help="python of the project's environment (default: this one)")
    parser.add_argument("--setup", default="tiny-llama", choices=["tiny-llama", "default"],
                        help="default: the embedded default model (exported to a Hugging Face folder) and data")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--steps", type=int, default=10, help="training steps per run, warm-up included")
    parser.add_argument("--warmup-steps", type=int, default=2, help="first steps left out of the measurement")
    parser.add_argument("--repeats", type=int, default=2, help="runs per trainer and mode, alternating")
    parser.add_argument("--micro-batch-size", type=int, default=8,
                        help="pairs per micro-batch on both sides (TRL: per_device_train_batch_size; "
                             f"gradient accumulation makes the global batch {GLOBAL_BATCH_PAIRS})")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each run (both trainers)")
    parser.add_argument("--ours-override", action="append", default=[], metavar="KEY=VALUE",
                        help="a Hydra override for nemo-dpo's run, e.g. model.data.packing=true (repeatable)")
    parser.add_argument("--trl-arg", action="append", default=[], metavar="FIELD=JSON",
                        help="a DPOConfig field for TRL's run, value as JSON, e.g. gradient_checkpointing=false "
                             "(repeatable)")
    parser.add_argument("--label", default="", help="names this comparison in the output (e.g. packing)")
    parser.add_argument("--work-dir", help="keep the set-up and run folders here (default: a temporary folder)")
    parser.add_argument("--output", help="JSON result file (default benchmarks/results/bench_trl[-LABEL].json)")
    args = parser.parse_args(argv)
    if args.warmup_steps < 1 or args.steps <= args.warmup_steps:
        parser.error("need --warmup-steps >= 1 (the first step holds one-off work) and --steps > --warmup-steps")
    if GLOBAL_BATCH_PAIRS % args.micro_batch_size:
        parser.error(f"--micro-batch-size must divide the global batch of {GLOBAL_BATCH_PAIRS} pairs")
    trl_args = {}
    for item in args.trl_arg:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--trl-arg {item!r}: expected FIELD=JSON")
        try:
            trl_args[key] = json.loads(value)
        except json.JSONDecodeError:
            trl_args[key] = value  # a bare string
    args.trl_args = trl_args
    return args


def ours_overrides(setup: dict, args: argparse.Namespace, mode: str, run_dir: Path) -> list[str]:
    """Hydra overrides of one nemo-dpo run: the shared settings, the mode's, then the user's (last wins)."""
    data = setup["ours_data"].replace("'", "\\'")
    return [
        f"pretrained_checkpoint.restore_from_path={setup['model_dir']}",
        f"model.data.data_prefix={{train: ['{data}']}}",
        f"exp_manager.explicit_log_dir={run_dir}",
        "exp_manager.create_checkpoint_callback=false", "exp_manager.create_tensorboard_logger=false",
        "exp_manager.resume_if_exists=false",
        f"trainer.dpo.max_steps={args.steps}", "trainer.dpo.max_epochs=1", "trainer.precision=32",
        f"model.global_batch_size={GLOBAL_BATCH_PAIRS}", f"model.micro_batch_size={args.micro_batch_size}",
        f"model.data.seq_length={setup['seq_length']}", f"model.data.append_eod={setup['append_eod']}",
        # TRL's schedule: linear decay, no warm-up. Neither changes the step's cost.
        f"model.seed={SEED}", f"model.optim.lr={LEARNING_RATE}", f"model.optim.sched.min_lr={LEARNING_RATE / 10}",
        "model.optim.sched.warmup_steps=0",
        f"model.dpo.ref_policy_kl_penalty={BETA}",
        *MODES[mode]["ours"], *args.ours_override,
    ]


def run_worker(side: str, python: str, spec: dict, run_dir: Path, env: dict) -> dict:
    """Start one run in its own process and return its result; its output goes to ``run_dir/log.txt``."""
    run_dir.mkdir(parents=True)
    spec_file, result_file, log_file = run_dir / "spec.json", run_dir / "result.json", run_dir / "log.txt"
    spec_file.write_text(json.dumps(spec))
    with open(log_file, "w") as log:
        process = subprocess.run([python, str(Path(__file__).resolve()), "_worker", side, str(spec_file),
                                  str(result_file)], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=run_dir)
    if process.returncode != 0:
        tail = log_file.read_text(errors="replace").splitlines()[-30:]
        raise RuntimeError(f"the {side} run in {run_dir} failed (exit {process.returncode}):\n" + "\n".join(tail))
    return json.loads(result_file.read_text())


def measure(result: dict, warmup: int) -> dict:
    """Throughput over the steps after ``warmup``: each step from the end of the previous one to its own end."""
    steps = result["steps"]
    measured = steps[warmup:]
    seconds = steps[-1]["time"] - steps[warmup - 1]["time"]
    total = {key: sum(step[key] for step in measured) for key in ("pairs", "pair_tokens", "min_tokens", "computed")}
    intervals = [b["time"] - a["time"] for a, b in zip(steps[warmup - 1:], measured)]
    return dict(
        measured_steps=len(measured), seconds=seconds, pairs=total["pairs"],
        pairs_per_s=total["pairs"] / seconds, tokens_per_s=total["pair_tokens"] / seconds,
        padding_fraction=1 - total["min_tokens"] / total["computed"],
        step_s_median=statistics.median(intervals), step_s_min=min(intervals),
        peak_rss_mib=result["peak_rss_bytes"] / 2**20,
        trained_pairs=sum(step["pairs"] for step in steps),
        trained_pair_tokens=sum(step["pair_tokens"] for step in steps),
    )


def check_same_data(runs: list[dict], setup: dict, steps: int) -> str:
    """Both trainers tokenised the same pairs to the same ids, and trained on as many pairs and tokens."""
    reference = runs[0]["result"]["pair_digests"]
    for run in runs:
        if run["result"]["pair_digests"] != reference:
            raise RuntimeError(f"{run['side']} run {run['repeat']} ({run['mode']}) tokenised the pairs differently "
                               "from the first run: the comparison would not be on the same token ids")
        expected = steps * GLOBAL_BATCH_PAIRS
        if run["measured"]["trained_pairs"] != expected:
            raise RuntimeError(f"{run['side']} run {run['repeat']} ({run['mode']}) trained on "
                               f"{run['measured']['trained_pairs']} pairs, not {expected}")
    tokens = {run["measured"]["trained_pair_tokens"] for run in runs}
    if len(tokens) != 1:
        raise RuntimeError(f"the runs trained on different token totals {sorted(tokens)}")
    # Both samplers happen to draw the same order from the same seed; say whether they did.
    orders = {tuple(step["pair_tokens"] for step in run["result"]["steps"]) for run in runs}
    order = ("the same pairs in every step on both sides (tokens per step equal)" if len(orders) == 1
             else "the two trainers drew the pairs in different orders")
    return (f"{len(reference)} pairs tokenised to identical ids on both sides (per-pair SHA-256 of the ids); "
            f"every run trained on {expected} pairs, {tokens.pop():,} tokens; {order}")


def scrub(value, replacements: dict[str, str]):
    """``value`` (nested JSON data) with this machine's paths replaced by placeholders."""
    if isinstance(value, dict):
        return {key: scrub(item, replacements) for key, item in value.items()}
    if isinstance(value, list):
        return [scrub(item, replacements) for item in value]
    if isinstance(value, str):
        for path, placeholder in replacements.items():
            value = value.replace(path, placeholder)
    return value


def summarise(runs: list[dict], modes: list[str]) -> dict:
    summary = {}
    for mode in modes:
        sides = {}
        for side in ("ours", "trl"):
            measured = [run["measured"] for run in runs if run["mode"] == mode and run["side"] == side]
            sides[side] = dict(
                pairs_per_s=statistics.median(m["pairs_per_s"] for m in measured),
                pairs_per_s_runs=[round(m["pairs_per_s"], 3) for m in measured],
                tokens_per_s=statistics.median(m["tokens_per_s"] for m in measured),
                padding_fraction=statistics.mean(m["padding_fraction"] for m in measured),
                peak_rss_mib=max(m["peak_rss_mib"] for m in measured),
            )
        ours, trl = sides["ours"], sides["trl"]
        # Each repeat's nemo-dpo run over the TRL run right after it: what the machine's load did to both.
        pair_ratios = [a / b for a, b in zip(ours["pairs_per_s_runs"], trl["pairs_per_s_runs"])]
        summary[mode] = dict(**sides, ratio=dict(
            pairs_per_s=ours["pairs_per_s"] / trl["pairs_per_s"],
            pairs_per_s_per_repeat=[round(r, 3) for r in pair_ratios],
            tokens_per_s=ours["tokens_per_s"] / trl["tokens_per_s"],
            peak_rss=ours["peak_rss_mib"] / trl["peak_rss_mib"],
        ))
    return summary


def table(summary: dict) -> str:
    lines = ["| mode | trainer | pairs/s (median; runs) | non-padding tokens/s | padding | peak RSS |",
             "|---|---|---|---|---|---|"]
    for mode, entry in summary.items():
        for side, name in (("ours", "nemo-dpo"), ("trl", "TRL")):
            s = entry[side]
            runs = ", ".join(f"{v:.2f}" for v in s["pairs_per_s_runs"])
            lines.append(f"| {mode} | {name} | {s['pairs_per_s']:.2f} ({runs}) | {s['tokens_per_s']:,.0f} "
                         f"| {s['padding_fraction']:.1%} | {s['peak_rss_mib']:,.0f} MiB |")
        r = entry["ratio"]
        per_repeat = ", ".join(f"{v:.2f}" for v in r["pairs_per_s_per_repeat"])
        lines.append(f"| {mode} | **nemo-dpo / TRL** | **{r['pairs_per_s']:.2f}x** ({per_repeat}) "
                     f"| {r['tokens_per_s']:.2f}x | | {r['peak_rss']:.2f}x |")
    return "\n".join(lines)


def run_comparison(args: argparse.Namespace, work: Path) -> dict:
    # The project's environment (this process): bench_dpo's helpers describe the machine and the checkout.
    sys.path.insert(0, str(REPO_ROOT))
    import torch
    from bench_dpo import device_name, git_revision

    started = time.time()
    load_before = os.getloadavg()[0]
    threads = str(args.threads)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    # Every math library gets the same thread count; tokenizers' thread pool stays off on both sides.
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, TOKENIZERS_PARALLELISM="false")
    # Ours: this checkout's nemo_dpo (not whatever copy the environment has installed).
    ours_env = dict(env, PYTHONPATH=str(REPO_ROOT))
    trl_env = dict(env, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    num_pairs = args.steps * GLOBAL_BATCH_PAIRS  # one epoch
    if args.setup == "default":
        setup = write_embedded_default(work / "setup", num_pairs, args.ours_python, ours_env)
    else:
        setup = write_tiny_llama(work / "setup", num_pairs)
    runs = []
    for mode in args.modes:
        for repeat in range(args.repeats):
            for side in ("ours", "trl"):
                run_dir = work / f"{mode}-{repeat}-{side}"
                if side == "ours":
                    spec = dict(threads=args.threads, overrides=ours_overrides(setup, args, mode, run_dir / "run"))
                    result = run_worker(side, args.ours_python, spec, run_dir, ours_env)
                else:
                    spec = dict(threads=args.threads, model_dir=setup["model_dir"], data=setup["trl_data"],
                                max_length=setup["seq_length"],
                                micro_batch_size=args.micro_batch_size, steps=args.steps,
                                output_dir=str(run_dir / "run"), trl_args={**MODES[mode]["trl"], **args.trl_args})
                    # Its own datasets cache, where TRL also keeps precomputed log-probs: each run
                    # precomputes afresh, as each of ours does in its own log folder.
                    result = run_worker(side, args.trl_python, spec, run_dir,
                                        dict(trl_env, HF_HOME=str(run_dir / "hf_home")))
                measured = measure(result, args.warmup_steps)
                runs.append(dict(mode=mode, repeat=repeat, side=side, spec=spec, measured=measured, result=result))
                print(f"{mode} #{repeat} {side}: {measured['pairs_per_s']:.2f} pairs/s, "
                      f"padding {measured['padding_fraction']:.1%}, peak RSS {measured['peak_rss_mib']:,.0f} MiB",
                      flush=True)
    same_data = check_same_data(runs, setup, args.steps)
    summary = summarise(runs, args.modes)
    first = {side: next(run["result"] for run in runs if run["side"] == side) for side in ("ours", "trl")}
    for run in runs:  # the digests are checked; the per-step records stay
        run["result"].pop("pair_digests")
    record = dict(
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"), commit=git_revision(),
        label=args.label, command="python benchmarks/bench_trl.py " + shlex.join(args.argv),
        machine=device_name(torch.device("cpu")), load_average_before=load_before, load_average_after=os.getloadavg()[0],
        wall_s=time.time() - started, threads=args.threads,
        versions=dict(ours=first["ours"]["versions"], trl=first["trl"]["versions"]),
        trl_config=first["trl"]["config"],
        settings=dict(steps=args.steps, warmup_steps=args.warmup_steps, repeats=args.repeats,
                      global_batch_pairs=GLOBAL_BATCH_PAIRS, micro_batch_pairs=args.micro_batch_size,
                      seq_length=setup["seq_length"], ours_overrides=args.ours_override, trl_args=args.trl_args),
        setup={k: v for k, v in setup.items() if k not in ("model_dir", "ours_data", "trl_data")},
        same_data=same_data, summary=summary, runs=runs,
    )
    # No path of this machine in the results: the work folder, the TRL interpreter, the checkout.
    return scrub(record, {str(work): "$WORK", args.trl_python: "$TRL_PYTHON", str(REPO_ROOT): "."})


def main(argv: list[str]) -> None:
    if argv[:1] == ["_worker"]:
        worker_main(*argv[1:])
        return
    args = parse_args(argv)
    args.argv = argv
    work = Path(args.work_dir).resolve() if args.work_dir else Path(tempfile.mkdtemp(prefix="bench_trl_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        record = run_comparison(args, work)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{record['machine']}, {args.threads} torch threads per run, fp32, global batch {GLOBAL_BATCH_PAIRS} "
          f"pairs, micro-batch {args.micro_batch_size}, {args.steps - args.warmup_steps} measured steps after "
          f"{args.warmup_steps}, {args.repeats} runs each, load average {record['load_average_before']:.1f} -> "
          f"{record['load_average_after']:.1f}\n{record['same_data']}\n")
    print(table(record["summary"]), flush=True)
    suffix = f"-{args.label}" if args.label else ""
    output = Path(args.output) if args.output else BENCH_DIR / "results" / f"bench_trl{suffix}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=1) + "\n")
    print(f"\nwritten: {output}")


if __name__ == "__main__":
    main(sys.argv[1:])
