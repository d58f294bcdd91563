"""Padded, packed and shared-prompt packed DPO steps, interleaved step by step in one process.

Each step draws one global batch (``bench_dpo``'s synthetic pairs and model, its
defaults) and runs a full ``bench_dpo`` step on it in each mode in turn, on the
same model (the mode is switched between steps), so the three see the same data
and, step by step, nearly the same machine load: on a shared CPU this compares
them far more fairly than separate runs. Reports wall and CPU seconds per step
(medians and minima) and each mode's ratio to padding, and appends a JSON record.

    python benchmarks/bench_packing.py --steps 6
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import time
from pathlib import Path

import torch

import bench_dpo
from nemo_dpo.data.collate import dpo_custom_collate
from nemo_dpo.models.nlp.gpt.architecture import precision_dtype
from nemo_dpo.models.nlp.gpt.megatron_gpt_dpo_model import MegatronGPTDPOModel, PackingSettings
from nemo_dpo.optim.optimizer import build_optimizer
from nemo_dpo.parallel.initialize import ParallelLayout, destroy_parallel, initialize_parallel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="measured steps per mode (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU seconds are the work done)")
    parser.add_argument("--output", default=str(bench_dpo.BENCH_DIR / "results" / "bench_packing.jsonl"),
                        help="JSON-lines file to append the record to ('' to skip)")
    options = parser.parse_args()
    args = bench_dpo.parse_args([])  # the model and batch shape of bench_dpo's defaults
    torch.set_num_threads(options.threads)
    load_average = os.getloadavg()[0]
    initialize_parallel(ParallelLayout(1, 1), seed=1234)
    cfg = bench_dpo.model_config(args)
    model = MegatronGPTDPOModel(cfg, args.vocab_size)
    optimizer = build_optimizer(model.model, cfg.optim, precision_dtype(cfg.precision))
    pack_tokens = args.micro_batch_size * 2 * args.seq_length  # model.data.pack_tokens' default
    modes = {
        "padded": PackingSettings(),
        "packed": PackingSettings(enabled=True, pack_tokens=pack_tokens),
        "packed_shared_prompt": PackingSettings(enabled=True, pack_tokens=pack_tokens, shared_prompt=True),
    }
    wall = {name: [] for name in modes}
    cpu = {name: [] for name in modes}
    counts = {}
    for step in range(1 + options.steps):
        items = bench_dpo.synthetic_pairs(args.global_batch_size, args.seq_length, args.vocab_size, seed=step)
        for name, settings in modes.items():
            model.packing = settings
            before = dataclasses.replace(model.token_counts)
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            bench_dpo.timed_dpo_step(model, optimizer, dpo_custom_collate(items, eos_id=bench_dpo.EOS),
                                     torch.device("cpu"), plain_first=step % 2 == 0)
            if step == 0:
                continue  # warm-up
            wall[name].append(time.perf_counter() - start_wall)
            cpu[name].append(time.process_time() - start_cpu)
            # Three passes per step (reference, plain policy forward, training) over the same rows.
            counts.setdefault(name, []).append({key: (getattr(model.token_counts, key) - getattr(before, key)) // 3
                                                for key in ("computed", "padding", "shared_prompt_saved")})
    record = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        commit=bench_dpo.git_revision(), device=bench_dpo.device_name(torch.device("cpu")), threads=options.threads,
        load_average_1min_at_start=load_average, global_batch_size=args.global_batch_size,
        micro_batch_size=args.micro_batch_size, seq_length=args.seq_length, pack_tokens=pack_tokens,
        steps=options.steps, step_wall_s=wall, step_cpu_s=cpu, step_tokens=counts,
    )
    lines = [f"{'mode':<22} {'wall s/step med':>15} {'min':>7} {'cpu s/step med':>15} {'min':>7} "
             f"{'x padded (wall, cpu med)':>24} {'padding':>8} {'prompt saved':>12}"]
    for name in modes:
        real = sum(c["computed"] - c["padding"] + c["shared_prompt_saved"] for c in counts[name])
        lines.append(
            f"{name:<22} {statistics.median(wall[name]):>15.3f} {min(wall[name]):>7.3f} "
            f"{statistics.median(cpu[name]):>15.3f} {min(cpu[name]):>7.3f} "
            f"{statistics.median(wall['padded']) / statistics.median(wall[name]):>17.2f}x, "
            f"{statistics.median(cpu['padded']) / statistics.median(cpu[name]):.2f}x "
            f"{sum(c['padding'] for c in counts[name]) / sum(c['computed'] for c in counts[name]):>8.1%} "
            f"{sum(c['shared_prompt_saved'] for c in counts[name]) / real:>12.1%}")
    print(f"1-min load average at start {load_average:.2f}; {args.global_batch_size} pairs per step")
    print("\n".join(lines))
    if options.output:
        Path(options.output).parent.mkdir(parents=True, exist_ok=True)
        with open(options.output, "a") as log:
            log.write(json.dumps(record) + "\n")
    destroy_parallel()


if __name__ == "__main__":
    main()
