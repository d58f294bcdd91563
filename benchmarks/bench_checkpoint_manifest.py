"""Save-time cost of checkpoint manifests: training checkpoints saved with and without one, side by side.

Each round saves the same training checkpoint (weights, Adam moments, training
state, tokenizer) twice, once as nemo-dpo does (SHA-256 of every file after
writing, ``manifest.json``) and once with the manifest step skipped, in
alternating order so both see the same machine load. Model: the shape of
``bench_dpo.py`` (4 layers, hidden 256, ffn 1024, vocab 8192: ~8M parameters).

    python benchmarks/bench_checkpoint_manifest.py --rounds 10

Prints a table and writes ``benchmarks/results/checkpoint_manifest.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch
from omegaconf import OmegaConf

from nemo_dpo.checkpoint import dist_ckpt
from nemo_dpo.checkpoint.integrity import MANIFEST
from nemo_dpo.checkpoint.training_checkpoint import save_training_checkpoint
from nemo_dpo.models.nlp.gpt.megatron_gpt_dpo_model import MegatronGPTDPOModel
from nemo_dpo.optim.optimizer import MegatronAdamW
from nemo_dpo.optim.settings import OptimizerSettings
from nemo_dpo.parallel.initialize import ParallelLayout, destroy_parallel, initialize_parallel

RESULT = Path(__file__).resolve().parent / "results" / "checkpoint_manifest.json"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10, help="saves of each kind")
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--ffn-hidden-size", type=int, default=1024)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--out", type=Path, default=RESULT)
    return parser.parse_args()


def build(args: argparse.Namespace):
    cfg = OmegaConf.create(dict(
        num_layers=args.num_layers, hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=8, num_query_groups=4, encoder_seq_length=512, normalization="rmsnorm",
        activation="swiglu", position_embedding_type="rope", bias=False, share_embeddings_and_output_weights=False,
        make_vocab_size_divisible_by=128, precision=32, micro_batch_size=1, global_batch_size=1,
    ))
    model = MegatronGPTDPOModel(cfg, args.vocab_size)
    optimizer = MegatronAdamW(model.model, OptimizerSettings(lr=1e-5))
    optimizer.step()  # Adam moments exist after a step: the checkpoint holds them, as a real one does
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer.optimizer, lambda step: 1.0)
    parameters = sum(p.numel() for chunk in model.model for p in chunk.parameters())
    return cfg, model, optimizer, scheduler, parameters


def timed_save(root: Path, name: str, with_manifest: bool, save) -> float:
    folder = root / name
    # The manifest step replaced by nothing: everything else about the save is the same.
    skip = contextlib.nullcontext() if with_manifest else mock.patch.object(dist_ckpt, "write_manifest", lambda _: None)
    with skip:
        start = time.perf_counter()
        save(folder)
        elapsed = time.perf_counter() - start
    assert (folder / MANIFEST).is_file() == with_manifest
    shutil.rmtree(folder)
    return elapsed


def main() -> None:
    args = parse_args()
    initialize_parallel(ParallelLayout(1, 1), seed=1234)
    cfg, model, optimizer, scheduler, parameters = build(args)
    root = Path(tempfile.mkdtemp(prefix="bench_manifest_"))
    tokenizer = root / "tokenizer"
    tokenizer.mkdir()
    (tokenizer / "tokenizer.json").write_text("{}")
    state = {"step": 1, "consumed_samples": 1, "epoch": 0}

    def save(folder: Path) -> None:
        save_training_checkpoint(folder, model, optimizer, scheduler, state, cfg, tokenizer)

    timed_save(root, "warmup", True, save)
    times: dict[str, list[float]] = {"with": [], "without": []}
    for round_ in range(args.rounds):
        order = (True, False) if round_ % 2 == 0 else (False, True)
        for with_manifest in order:
            times["with" if with_manifest else "without"].append(
                timed_save(root, f"r{round_}-{with_manifest}", with_manifest, save))
    save(root / "kept")
    checkpoint_bytes = sum(p.stat().st_size for p in (root / "kept").rglob("*") if p.is_file())
    start = time.perf_counter()
    dist_ckpt.write_manifest(root / "kept")
    manifest_alone = time.perf_counter() - start
    shutil.rmtree(root)
    destroy_parallel()

    median = {kind: statistics.median(values) for kind, values in times.items()}
    record = {
        "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "load_average": os.getloadavg()[0], "rounds": args.rounds,
        "parameters": parameters, "checkpoint_bytes": checkpoint_bytes,
        "save_s_median": median, "save_s_min": {kind: min(v) for kind, v in times.items()},
        "save_s_all": times, "manifest_alone_s": manifest_alone,
        "ratio_median": median["with"] / median["without"],
        "hash_mb_per_s": checkpoint_bytes / manifest_alone / 1e6,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"{parameters / 1e6:.1f}M parameters, checkpoint {checkpoint_bytes / 1e6:.1f} MB, {args.rounds} saves each")
    print("| save | median s | min s |\n|---|---|---|")
    for kind in ("without", "with"):
        print(f"| {kind} manifest | {median[kind]:.3f} | {record['save_s_min'][kind]:.3f} |")
    print(f"ratio (with / without, medians): {record['ratio_median']:.3f}; manifest alone {manifest_alone:.3f} s "
          f"({record['hash_mb_per_s']:.0f} MB/s)")


if __name__ == "__main__":
    main()
