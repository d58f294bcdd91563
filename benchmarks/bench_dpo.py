"""Throughput of full DPO training steps: pairs/s, tokens/s, step time, peak memory, model FLOP/s, MFU.

A measured step is what ``DPOTrainer`` does with one global batch: the reference
policy's log-probs (``get_ref_policy_logprobs``, a forward-only pass with the
frozen weights swapped in), then ``prepare_for_training_step``,
``get_loss_and_metrics(forward_only=False)`` and the optimizer step (megatron-core's, as in training). The
two phases are timed separately. Each step also times, untimed in the step, a plain
forward-only log-prob pass with the policy's own weights on the same batch
(``get_logprob_batch``): the reference forward over it is the cost of where the
reference lives (``--ref-placement``, ``model.dpo.ref_policy_placement``). MFU divides the model FLOP/s by a matrix-multiply
ceiling measured in the same run, on the same ranks and threads.

    python benchmarks/bench_dpo.py                                          # one process
    torchrun --nproc-per-node 2 benchmarks/bench_dpo.py --tp 2 --threads 1  # or --pp 2
    python benchmarks/bench_dpo.py --lora 16                                # LoRA DPO, adapter_dim 16

``--lora`` also reports what LoRA changes in memory: parameters trained, the
optimizer state (``MegatronAdamW.state_bytes``), DDP's gradient buffers and the
bytes of a reference copy (none with LoRA: the reference is the base with
adapters off); compare with the same command without ``--lora``.

Only rank 0 prints and writes. See benchmarks/RESULTS.md for the method and numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import time
from pathlib import Path

import megatron.core
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
from omegaconf import OmegaConf

from nemo_dpo.data.collate import dpo_custom_collate
from nemo_dpo.models.nlp.gpt.architecture import precision_dtype
from nemo_dpo.models.nlp.gpt.megatron_gpt_dpo_model import MegatronGPTDPOModel
from nemo_dpo.optim.optimizer import MegatronAdamW, build_optimizer
from nemo_dpo.parallel.device import accelerator_device
from nemo_dpo.parallel.initialize import ParallelLayout, destroy_parallel, initialize_parallel

EOS = 0
BENCH_DIR = Path(__file__).resolve().parent
MARKDOWN_HEADER = (
    "| date (UTC) | commit | device | procs x threads | TP | PP | DP | layers/hidden/ffn/heads/groups/vocab "
    "| seq | GBS/MBS | steps | padding | pairs/s | tokens/s (non-pad) | s/step mean | s/step min "
    "| ref share | peak mem/rank | model GFLOP/s | ceiling GFLOP/s | MFU |\n"
    "|" + "---|" * 21 + "\n"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("model (rmsnorm, swiglu, rope, no biases, untied output layer)")
    model.add_argument("--num-layers", type=int, default=4)
    model.add_argument("--hidden-size", type=int, default=256)
    model.add_argument("--ffn-hidden-size", type=int, default=1024)
    model.add_argument("--num-attention-heads", type=int, default=8)
    model.add_argument("--num-query-groups", type=int, default=4)
    model.add_argument("--vocab-size", type=int, default=8192)
    run = parser.add_argument_group("run")
    run.add_argument("--seq-length", type=int, default=128,
                     help="longest prompt+response; each side is drawn between half of it and all of it")
    run.add_argument("--global-batch-size", type=int, default=8, help="pairs per step, over all DP ranks")
    run.add_argument("--micro-batch-size", type=int, default=2, help="pairs per micro-batch")
    run.add_argument("--precision", default="32", choices=["32", "bf16"],
                     help="bf16: bf16 weights and compute, fp32 master weights in the optimizer")
    run.add_argument("--optimizer", default="adamw", choices=["adamw", "distributed_fused_adam"],
                     help="distributed_fused_adam shards master weights and Adam moments over DP ranks")
    run.add_argument("--tp", type=int, default=1)
    run.add_argument("--pp", type=int, default=1)
    run.add_argument("--steps", type=int, default=5, help="measured steps")
    run.add_argument("--warmup-steps", type=int, default=2, help="full steps run before measuring")
    run.add_argument("--packing", action="store_true",
                     help="model.data.packing: whole pairs packed into rows of micro-batch x 2 x seq-length tokens")
    run.add_argument("--shared-prompt", action="store_true",
                     help="model.data.shared_prompt (needs --packing): each pair's prompt computed once")
    run.add_argument("--ref-placement", choices=("auto", "device", "cpu"), default="auto",
                     help="model.dpo.ref_policy_placement: where the frozen reference weights live")
    run.add_argument("--lora", type=int, default=0, metavar="ADAPTER_DIM",
                     help="LoRA DPO with this adapter_dim (model.peft.peft_scheme=lora; 0: full DPO)")
    run.add_argument("--lora-targets", nargs="+", default=["all"],
                     help="model.peft.lora_tuning.target_modules with --lora")
    run.add_argument("--threads", type=int, default=None,
                     help="torch threads per process (default: CPU cores / processes on this node)")
    run.add_argument("--output", default=str(BENCH_DIR / "results" / "bench_dpo.jsonl"),
                     help="JSON-lines file to append this run's record to ('' to skip)")
    run.add_argument("--markdown", default=str(BENCH_DIR / "RESULTS.md"),
                     help="markdown file whose last table gets this run's row ('' to skip)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.shared_prompt and not args.packing:
        parser.error("--shared-prompt needs --packing")
    return args


def synthetic_pairs(count: int, seq_length: int, vocab_size: int, seed: int) -> list[dict]:
    """Dataset items: a random prompt shared by a chosen and a rejected response.

    Each side (prompt + response + eos) is between ``seq_length // 2`` and
    ``seq_length`` tokens long, so batches padded to their longest sequence carry
    padding, as real preference data does. The prompt is masked out of the labels.
    """
    gen = torch.Generator().manual_seed(seed)

    def draw(low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, (1,), generator=gen))

    items = []
    for _ in range(count):
        prompt = torch.randint(1, vocab_size, (draw(seq_length // 8, seq_length // 2 - 2),), generator=gen)
        item = {"chosen_reward": 1.0, "rejected_reward": 0.0}
        for side in ("chosen", "rejected"):
            length = draw(seq_length // 2, seq_length)
            response = torch.randint(1, vocab_size, (length - len(prompt) - 1,), generator=gen)
            tokens = torch.cat([prompt, response, torch.tensor([EOS])])
            labels = tokens.clone()
            labels[: len(prompt)] = -100
            item.update({side: tokens, f"{side}_labels": labels, f"{side}_length": len(tokens)})
        items.append(item)
    return items


def model_config(args: argparse.Namespace) -> OmegaConf:
    return OmegaConf.create(dict(
        num_layers=args.num_layers, hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads, num_query_groups=args.num_query_groups,
        encoder_seq_length=args.seq_length, normalization="rmsnorm", activation="swiglu",
        position_embedding_type="rope", bias=False, share_embeddings_and_output_weights=False,
        make_vocab_size_divisible_by=128, precision=int(args.precision) if args.precision == "32" else args.precision,
        optim=dict(name=args.optimizer, lr=1e-5, weight_decay=0.01),
        micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size,
        dpo=dict(ref_policy_kl_penalty=0.1, log_prob_forward_micro_batch_size=args.micro_batch_size,
                 ref_policy_placement=args.ref_placement),
        data=dict(packing=args.packing, shared_prompt=args.shared_prompt),
        peft=dict(peft_scheme="lora" if args.lora else "none",
                  lora_tuning=dict(adapter_dim=args.lora or 1, target_modules=args.lora_targets)),
    ))


def memory_footprint(model: MegatronGPTDPOModel, optimizer: MegatronAdamW) -> dict[str, int]:
    """This rank's trained parameters and the bytes of their gradient buffers, optimizer state and reference copy.

    The reference copy is what the reference policy holds beyond the model's own
    parameters (with LoRA it holds none: its weights are the frozen base's).
    """
    params = [p for chunk in model.model for p in chunk.module.parameters()]
    own = {p.untyped_storage().data_ptr() for p in params}
    reference = model.reference_policy.state_dict().values()
    return dict(
        trained_params=sum(p.numel() for p in params if p.requires_grad),
        grad_buffer_bytes=sum(b.grad_data.numel() * b.grad_data.element_size()
                              for chunk in model.model for b in chunk.buffers),
        optimizer_state_bytes=optimizer.state_bytes(),
        reference_copy_bytes=sum(t.numel() * t.element_size() for t in reference
                                 if t.untyped_storage().data_ptr() not in own),
    )


def all_reduce(value: float, op=dist.ReduceOp.SUM, group=None) -> float:
    """``value`` reduced over ``group`` (NCCL needs a device tensor, gloo takes a CPU one)."""
    tensor = torch.tensor([value], dtype=torch.float64, device=accelerator_device())
    dist.all_reduce(tensor, op=op, group=group)
    return tensor.item()


def parameter_counts(model: MegatronGPTDPOModel) -> tuple[int, int]:
    """(all parameters, parameters in matmuls) of the whole model, each shard counted once.

    The input embedding is a table lookup, not a matmul, so the FLOP count leaves
    it out; the output layer is untied here and counted. Norm gains are counted
    (a rounding error). Padded vocabulary rows are counted: they are computed.
    """
    total = matmul = 0
    for chunk in model.model:
        for name, param in chunk.module.named_parameters():
            # TP-replicated parameters (norms) are held by every TP rank: count rank 0's.
            if not param_is_not_tensor_parallel_duplicate(param):
                continue
            total += param.numel()
            if not name.startswith("embedding."):
                matmul += param.numel()
    group = parallel_state.get_model_parallel_group()
    return int(all_reduce(total, group=group)), int(all_reduce(matmul, group=group))


def batch_shape(items: list[dict], dp_size: int) -> dict[str, int]:
    """Token counts of one global batch as the DP ranks see it (each pads to its own longest row).

    ``rows`` sequences are processed per forward (chosen and rejected), ``processed``
    tokens including padding, ``real`` tokens without, and ``seq_sq`` = sum over
    sequences of the padded length squared (for the attention FLOPs).
    """
    per_rank = len(items) // dp_size
    shape = dict(rows=0, processed=0, real=0, seq_sq=0)
    for rank in range(dp_size):
        local = items[rank * per_rank:(rank + 1) * per_rank]
        lengths = [item[f"{side}_length"] for item in local for side in ("chosen", "rejected")]
        padded = max(lengths)
        shape["rows"] += len(lengths)
        shape["processed"] += len(lengths) * padded
        shape["real"] += sum(lengths)
        shape["seq_sq"] += len(lengths) * padded**2
    return shape


def step_flops(shape: dict[str, int], matmul_params: int, layers: int, hidden: int) -> tuple[float, float]:
    """Model FLOPs of (reference forward, training forward+backward) on one global batch.

    Standard estimate over processed (padded) tokens T: 2 N T per forward and
    6 N T per forward+backward, plus attention scores and values,
    4 L h s^2 per sequence forward (x3 with backward); causal masking is not
    discounted, as usual. Activation recomputation is off, so nothing else runs.
    """
    attention = 4 * layers * hidden * shape["seq_sq"]
    reference = 2 * matmul_params * shape["processed"] + attention
    train = 6 * matmul_params * shape["processed"] + 3 * attention
    return float(reference), float(train)


def finish_phase(device: torch.device) -> float:
    """Wait for this rank's device work and for every rank, then read the clock.

    A phase thus lasts until its slowest rank is done, so per-phase times are
    not skewed by one rank idling in the next phase's first collective.
    """
    if device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    return time.perf_counter()


def timed_dpo_step(model: MegatronGPTDPOModel, optimizer: MegatronAdamW, batch: dict,
                   device: torch.device, plain_first: bool) -> tuple[float, float, float, float, float]:
    """One DPOTrainer step (augment_dataloader, then train_single_step) and a plain policy forward.

    The plain forward-only log-prob pass (policy weights, same batch) runs before
    or after the reference pass (``plain_first``; alternate it so neither order
    is favoured) and is not part of the step. Returns (plain forward s, ref s, train s, loss,
    this process's CPU seconds in the ref and train phases: on a loaded machine they
    move much less than wall time).
    """
    def plain_forward() -> float:
        start = finish_phase(device)
        model.get_logprob_batch(batch)
        return finish_phase(device) - start

    plain_s = plain_forward() if plain_first else 0.0
    start = finish_phase(device)
    cpu_start = time.process_time()
    logprobs = model.get_ref_policy_logprobs(batch)
    batch["ref_policy_log_probs_chosen"], batch["ref_policy_log_probs_rejected"] = logprobs.chunk(2)
    ref_s = finish_phase(device) - start
    cpu_s = time.process_time() - cpu_start
    if not plain_first:
        plain_s = plain_forward()
    start = finish_phase(device)
    cpu_start = time.process_time()
    optimizer.zero_grad()
    model.prepare_for_training_step()
    loss, _ = model.get_loss_and_metrics(batch, forward_only=False)
    updated, grad_norm, _ = optimizer.step(clip_grad=1.0)
    train_s = finish_phase(device) - start
    cpu_s += time.process_time() - cpu_start
    if not updated:
        raise RuntimeError(f"non-finite gradient norm {grad_norm}: the benchmark would time a skipped update")
    return plain_s, ref_s, train_s, loss, cpu_s


def matmul_ceiling(device: torch.device, repeats: int = 5) -> tuple[float, str]:
    """Dense-matmul FLOP/s of all ranks multiplying at once (best of ``repeats`` per rank, summed).

    fp32 on CPU, bf16 on GPU (the usual MFU reference). Ranks start together,
    so on a shared CPU they contend for cores and memory as they do in training.
    """
    on_gpu = device.type == "cuda"
    size, dtype, calls = (8192, torch.bfloat16, 20) if on_gpu else (2048, torch.float32, 3)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # first call pays for library initialisation
    best = float("inf")
    for _ in range(repeats):
        start = finish_phase(device)
        # Several calls per timing: amortises GPU launch latency, and on CPU one
        # timing is not a lucky (or unlucky) fraction of a second.
        for _ in range(calls):
            a @ b
        if on_gpu:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return all_reduce(2 * size**3 * calls / best), f"{size}x{size} {str(dtype).removeprefix('torch.')} matmul"


def peak_memory_bytes(device: torch.device) -> int:
    """This rank's peak: GPU memory allocated by torch, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "CPU"
    with open("/proc/cpuinfo") as cpuinfo:
        model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), model)
    return f"{model}, {os.cpu_count()} cores"


def git_revision() -> str:
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=BENCH_DIR, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    args = parse_args()
    # Other work on the machine skews every number here; record how busy it was.
    load_average = os.getloadavg()[0]
    # Processes share the node's cores; more threads than cores only adds contention.
    local_procs = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    threads = args.threads or max(1, (os.cpu_count() or 1) // local_procs)
    torch.set_num_threads(threads)

    initialize_parallel(ParallelLayout(args.tp, args.pp), seed=1234)
    device = accelerator_device()
    dp_size = parallel_state.get_data_parallel_world_size()
    if args.global_batch_size % (args.micro_batch_size * dp_size):
        raise ValueError(f"--global-batch-size {args.global_batch_size} is not a multiple of "
                         f"--micro-batch-size {args.micro_batch_size} x DP {dp_size}")
    cfg = model_config(args)
    model = MegatronGPTDPOModel(cfg, args.vocab_size)
    optimizer = build_optimizer(model.model, cfg.optim, precision_dtype(cfg.precision))
    total_params, matmul_params = parameter_counts(model)

    per_rank = args.global_batch_size // dp_size
    dp_rank = parallel_state.get_data_parallel_rank()
    policy_forward_times, ref_times, train_times, cpu_times, shapes = [], [], [], [], []
    ref_flops = train_flops = 0.0
    counted = None
    for step in range(args.warmup_steps + args.steps):
        if step == args.warmup_steps:
            counted = dataclasses.replace(model.token_counts)
        # Every rank draws the same global batch (same seed), so TP/PP ranks agree and
        # every layout sees the same data; each DP rank keeps its slice.
        items = synthetic_pairs(args.global_batch_size, args.seq_length, args.vocab_size, seed=step)
        batch = dpo_custom_collate(items[dp_rank * per_rank:(dp_rank + 1) * per_rank], eos_id=EOS)
        policy_s, ref_s, train_s, loss, cpu_s = timed_dpo_step(model, optimizer, batch, device, plain_first=step % 2 == 0)
        if step < args.warmup_steps:
            continue
        policy_forward_times.append(policy_s)
        ref_times.append(ref_s)
        train_times.append(train_s)
        cpu_times.append(cpu_s)
        shape = batch_shape(items, dp_size)
        shapes.append(shape)
        ref, train = step_flops(shape, matmul_params, args.num_layers, args.hidden_size)
        ref_flops, train_flops = ref_flops + ref, train_flops + train
    peak_memory = all_reduce(peak_memory_bytes(device), op=dist.ReduceOp.MAX)
    footprint = memory_footprint(model, optimizer)
    # Measured after the steps: its buffers must not count in the peak memory above.
    ceiling, ceiling_kind = matmul_ceiling(device)

    # Token positions the model computed in the measured steps (each step runs three passes over
    # its batch: reference, plain policy forward and training), padding and shared prompts included.
    dp_group = parallel_state.get_data_parallel_group()
    computed, padding, shared_saved = (
        all_reduce(getattr(model.token_counts, key) - getattr(counted, key), group=dp_group)
        for key in ("computed", "padding", "shared_prompt_saved"))
    step_times = [r + t for r, t in zip(ref_times, train_times)]
    elapsed = sum(step_times)
    processed = sum(s["processed"] for s in shapes)
    real = sum(s["real"] for s in shapes)
    model_flops_per_s = (ref_flops + train_flops) / elapsed
    record = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        commit=git_revision(), device=device_name(device), torch=torch.__version__,
        precision=args.precision, optimizer=args.optimizer,
        megatron_core=megatron.core.__version__, world_size=dist.get_world_size(), threads_per_process=threads,
        tp=args.tp, pp=args.pp, dp=dp_size,
        model=dict(num_layers=args.num_layers, hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size,
                   num_attention_heads=args.num_attention_heads, num_query_groups=args.num_query_groups,
                   vocab_size=args.vocab_size, params=total_params, matmul_params=matmul_params),
        seq_length=args.seq_length, global_batch_size=args.global_batch_size,
        micro_batch_size=args.micro_batch_size, warmup_steps=args.warmup_steps, steps=args.steps,
        padding_fraction=1 - real / processed,
        computed_tokens_per_step=computed / 3 / args.steps,
        computed_padding_fraction=padding / computed,
        shared_prompt_saved_fraction=shared_saved / (computed - padding + shared_saved),
        pairs_per_s=args.global_batch_size * args.steps / elapsed,
        # CPU seconds of all ranks (one thread each: no spinning threads counted).
        pairs_per_cpu_s=args.global_batch_size * args.steps / all_reduce(sum(cpu_times)),
        real_tokens_per_s=real / elapsed,
        processed_tokens_per_s=processed / elapsed,
        step_s_mean=elapsed / args.steps, step_s_min=min(step_times), step_s_max=max(step_times),
        ref_share=sum(ref_times) / elapsed,
        ref_placement=model.reference_policy.placement, ref_placement_requested=args.ref_placement,
        packing=args.packing, shared_prompt=args.shared_prompt, lora_adapter_dim=args.lora,
        lora_targets=args.lora_targets if args.lora else None, **footprint,
        # Medians: one slow step (a busy machine) does not decide the ratio.
        ref_over_policy_forward=statistics.median(ref_times) / statistics.median(policy_forward_times),
        ref_forward_s_median=statistics.median(ref_times),
        policy_forward_s_median=statistics.median(policy_forward_times), ref_flops_share=ref_flops / (ref_flops + train_flops),
        peak_memory_bytes_per_rank=int(peak_memory),
        memory_measure="torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak RSS",
        model_flops_per_step=(ref_flops + train_flops) / args.steps, model_flops_per_s=model_flops_per_s,
        ceiling_flops_per_s=ceiling, ceiling=ceiling_kind, mfu=model_flops_per_s / ceiling,
        last_loss=loss, load_average_1min_at_start=load_average,
        step_times_ref_s=ref_times, step_times_policy_forward_s=policy_forward_times, step_times_train_s=train_times,
        step_cpu_s=cpu_times,
        step_processed_tokens=[s["processed"] for s in shapes],
    )
    if dist.get_rank() == 0:
        report(record, args)
    destroy_parallel()


def report(record: dict, args: argparse.Namespace) -> None:
    """Print the results table and append the record to the JSON-lines and markdown logs."""
    r = record
    rows = [
        ("date (UTC)", r["date"]),
        ("1-min load average at start", f"{r['load_average_1min_at_start']:.2f}"),
        ("commit", r["commit"]),
        ("device", r["device"]),
        ("precision, optimizer", f"{r['precision']}, {r['optimizer']}"),
        ("torch / megatron-core", f"{r['torch']} / {r['megatron_core']}"),
        ("processes x threads", f"{r['world_size']} x {r['threads_per_process']}"),
        ("layout", f"TP={r['tp']} PP={r['pp']} DP={r['dp']}"),
        ("parameters (all / in matmuls)", f"{r['model']['params']:,} / {r['model']['matmul_params']:,}"),
        ("global / micro batch (pairs)", f"{r['global_batch_size']} / {r['micro_batch_size']}"),
        ("measured steps (after warm-up)", f"{r['steps']} (after {r['warmup_steps']})"),
        ("padding of the global batch (not all computed)", f"{r['padding_fraction']:.1%}"),
        ("padding of the computed tokens", f"{r['computed_padding_fraction']:.1%}"),
        ("computed tokens per step and pass", f"{r['computed_tokens_per_step']:,.0f}"),
        ("tokens not computed: shared prompts", f"{r['shared_prompt_saved_fraction']:.1%}"),
        ("pairs/s", f"{r['pairs_per_s']:.3f}"),
        ("pairs per CPU second (all ranks)", f"{r['pairs_per_cpu_s']:.3f}"),
        ("non-padding tokens/s", f"{r['real_tokens_per_s']:,.0f}"),
        ("processed (padded) tokens/s", f"{r['processed_tokens_per_s']:,.0f}"),
        ("s/step mean / min / max", f"{r['step_s_mean']:.3f} / {r['step_s_min']:.3f} / {r['step_s_max']:.3f}"),
        ("reference-forward share of step time", f"{r['ref_share']:.1%}"),
        ("reference-forward share of model FLOPs", f"{r['ref_flops_share']:.1%}"),
        ("reference placement (requested)", f"{r['ref_placement']} ({r['ref_placement_requested']})"),
        ("packing, shared prompt", f"{'on' if r['packing'] else 'off'}, {'on' if r['shared_prompt'] else 'off'}"),
        ("LoRA adapter_dim (targets)", f"{r['lora_adapter_dim']} ({r['lora_targets']})" if r["lora_adapter_dim"] else "off"),
        ("trained parameters (rank 0)", f"{r['trained_params']:,}"),
        ("grad buffers / optimizer state / reference copy (rank 0)",
         f"{r['grad_buffer_bytes'] / 2**20:,.1f} / {r['optimizer_state_bytes'] / 2**20:,.1f} / "
         f"{r['reference_copy_bytes'] / 2**20:,.1f} MiB"),
        ("reference / plain policy forward, median s",
         f"{r['ref_forward_s_median']:.4f} / {r['policy_forward_s_median']:.4f}"),
        ("reference over plain policy forward (medians)", f"{r['ref_over_policy_forward']:.2f}x"),
        (f"peak memory per rank ({r['memory_measure']})", f"{r['peak_memory_bytes_per_rank'] / 2**20:,.0f} MiB"),
        ("model FLOPs per step (padded tokens)", f"{r['model_flops_per_step'] / 1e9:,.1f} G"),
        ("model FLOP/s", f"{r['model_flops_per_s'] / 1e9:,.2f} G"),
        (f"ceiling ({r['ceiling']}, all ranks)", f"{r['ceiling_flops_per_s'] / 1e9:,.2f} G"),
        ("MFU", f"{r['mfu']:.1%}"),
        ("loss (last step, sanity)", f"{r['last_loss']:.4f}"),
    ]
    width = max(len(label) for label, _ in rows)
    print("\n".join(f"{label:<{width}}  {value}" for label, value in rows), flush=True)

    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        with open(args.output, "a") as log:
            log.write(json.dumps(record) + "\n")
    if args.markdown:
        m = r["model"]
        cells = [
            r["date"], r["commit"], f"{r['device']} ({r['precision']}, {r['optimizer']})",
            f"{r['world_size']} x {r['threads_per_process']}",
            r["tp"], r["pp"], r["dp"],
            "/".join(str(m[k]) for k in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                                         "num_query_groups", "vocab_size")),
            r["seq_length"], f"{r['global_batch_size']}/{r['micro_batch_size']}", r["steps"],
            f"{r['padding_fraction']:.1%}", f"{r['pairs_per_s']:.3f}", f"{r['real_tokens_per_s']:,.0f}",
            f"{r['step_s_mean']:.3f}", f"{r['step_s_min']:.3f}", f"{r['ref_share']:.1%}",
            f"{r['peak_memory_bytes_per_rank'] / 2**20:,.0f} MiB", f"{r['model_flops_per_s'] / 1e9:,.2f}",
            f"{r['ceiling_flops_per_s'] / 1e9:,.2f}", f"{r['mfu']:.1%}",
        ]
        path = Path(args.markdown)
        new_file = not path.exists() or path.stat().st_size == 0
        with open(path, "a") as table:
            if new_file:
                table.write(MARKDOWN_HEADER)
            table.write("| " + " | ".join(str(cell) for cell in cells) + " |\n")


if __name__ == "__main__":
    main()
