"""Memory of a DPO training step per rank: measured against a formula, then projected to Llama 3 8B/70B.

Each configuration (precision, optimizer sharding, activation recompute, chunked
log-probs) runs one DPO step in a fresh process (a torchrun of 2 processes for
the DP=2 ones), so that nothing, the peak RSS included, carries over. A step is
what ``DPOTrainer`` does: ``get_ref_policy_logprobs``, ``prepare_for_training_step``,
``get_loss_and_metrics(forward_only=False)``, ``optimizer.step(clip_grad=1.0)``,
with the model and optimizer built as the library builds them.

What is measured (CPU has no allocator statistics, so the bytes are counted from
the tensors themselves, each storage once):

* static bytes: parameters, DDP gradient (and parameter) buffers, optimizer
  state (Adam moments, fp32 master weights), the frozen reference copy;
* activation bytes: what autograd saves for backward during the policy forward
  (``saved_tensors_hooks``; parameters and gradient buffers left out), and the
  peak of what is saved and still alive at any point of forward and backward
  (higher than the forward's total with full recompute: a layer's recomputed
  activations join the checkpoints);
* peak RSS of the process (``ru_maxrss``), and on GPU ``torch.cuda.max_memory_allocated``
  per phase (reference forward, training step).

The formula (module level: :func:`params_per_rank`, :func:`static_bytes`,
:func:`layer_activation_bytes`, :func:`activation_bytes`, :func:`logits_bytes`)
is then checked against the measurements and used to project Llama 3 8B and 70B
DPO on 8 x 80 GB GPUs.

    python benchmarks/bench_memory.py                      # all configurations, then the projection
    python benchmarks/bench_memory.py --only bf16 bf16-full # some of them

See benchmarks/RESULTS.md ("Memory: measured vs formula") for the derivation and numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
GIB = 2**30
EOS = 0

# ---------------------------------------------------------------------------------------------------------- formula
#
# Bytes per parameter on a rank (P = parameters this rank holds, see params_per_rank):
#
#   precision  weights  gradient buffer  fp32 master  Adam m + v  reference
#   fp32       4        4                -            8           4
#   bf16       2        4 (fp32 reduce)  4            8           2
#
# megatron DDP accumulates and reduces gradients in fp32 (``grad_reduce_in_fp32``,
# the library's default) whatever the parameter dtype. With the sharded optimizer
# (``distributed_fused_adam``: megatron's DistributedOptimizer, ZeRO-1) the master
# weights and Adam moments are divided by DP; weights and gradients are not. The
# reference policy is a copy of the weights in their dtype (the library keeps it
# in host memory and swaps it in; the projection assumes it resident on the GPU).
#
# Activations: what autograd keeps for backward, read off a saved-tensor listing of
# megatron-core's local layer spec with our SDPA core attention (RMSNorm, SwiGLU,
# RoPE, GQA, no biases, no sequence parallelism, no dropout). For a micro-batch of
# b rows (2 per pair) of s tokens, T = b s tokens, hidden h, ffn f, a heads,
# g query groups, head dim k = h / a, dtype bytes d, TP size t, per layer:
#
#   two RMSNorms        2 x (2 T h 4 + 4 T)  torch computes them in fp32 and keeps its
#                                             fp32 input, the normalised x and 1/rms
#   linear_qkv, fc1 in  2 x T h d            inputs of the column-parallel matmuls
#                                             (replicated over TP without SP)
#   RoPE cos/sin        4 s k d              for q and for k
#   attention           T k d (3a + 3g) / t  q and k after RoPE (a + g), the qkv matmul's
#                                             output that v is a view of (a + 2g), the
#                                             context, also linear_proj's input (a)
#   softmax stats       4 T a / t            SDPA's fp32 log-sum-exp per query and head
#   SwiGLU MLP          5 T f d / t          fc1's output (2f), sigmoid and silu (2f),
#                                             fc2's input (f)
#
# Selective recompute (megatron's ``core_attn``) keeps q, k, qkv and the context but
# not SDPA's log-sum-exp: with a fused/flash-style attention there is no s^2 score
# matrix to save, so it saves only 4 T a / t bytes per layer. Full recompute
# (uniform, 1 layer per checkpoint) keeps each layer's input, T h d, plus one shared
# fp32 RoPE table (4 s k); during backward one layer at a time is recomputed, so
# the live peak adds a whole layer's activations (the head's are freed by then).
#
# Around the layers: the embedding keeps the token ids (8 T); the final RMSNorm
# 2 T h 4 + 4 T; with whole log-probs the output layer keeps its input (T h d) and
# the log-prob function the fp32 softmax of the logits, 4 T' V / t (T' = b (s - 1)
# rows with targets, V the padded vocabulary), plus int64 targets and a bool mask
# (9 T'). Chunked log-probs keep a copy of the hidden states (T' h d), the targets
# and the fp32 max and sum per row (16 T'), and hold the logits of one chunk at a
# time. The peak of the whole-logits step is higher than what it saves: the logits
# in the model's dtype and their fp32 copy exist together, (4 + d) T' V / t; a chunk
# needs (4 + d) c V / t.
#
# Pipeline parallelism with 1F1B: the first stage holds the activations of PP
# micro-batches at once (its L / PP layers each), so the layers' total per rank is
# the same as without PP; the last stage holds one micro-batch's and the logits.
# Small per-token integers and flags of the loss (a few bytes per token) are left out.


@dataclass(frozen=True)
class Shape:
    """A GPT shape (RMSNorm, SwiGLU, RoPE, GQA, no biases, untied output layer)."""

    layers: int
    hidden: int
    ffn: int
    heads: int
    groups: int
    vocab: int
    vocab_divisible_by: int = 128

    def padded_vocab(self, tp: int) -> int:
        """megatron pads the vocabulary to a multiple of ``make_vocab_size_divisible_by`` x TP."""
        multiple = self.vocab_divisible_by * tp
        return -(-self.vocab // multiple) * multiple


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    sharded_optimizer: bool = False


def layer_params(shape: Shape, tp: int) -> int:
    """Parameters of one transformer layer on one TP rank (norm gains replicated)."""
    h, k = shape.hidden, shape.hidden // shape.heads
    qkv = h * (shape.heads + 2 * shape.groups) * k
    proj = shape.heads * k * h
    mlp = 3 * h * shape.ffn  # fc1 (gate and up) and fc2
    return (qkv + proj + mlp) // tp + 2 * h


def params_per_rank(shape: Shape, layout: Layout) -> int:
    """Parameters the busiest pipeline stage's rank holds: its layers plus one (padded) vocabulary matrix.

    With PP=1 the rank has both the embedding and the output layer; with PP>1 the
    first stage has the embedding and the last the output layer and final norm
    (the larger of the two is returned).
    """
    vocab_matrix = shape.padded_vocab(layout.tp) * shape.hidden // layout.tp
    layers = shape.layers // layout.pp * layer_params(shape, layout.tp)
    if layout.pp == 1:
        return layers + 2 * vocab_matrix + shape.hidden
    return layers + vocab_matrix + shape.hidden


def static_bytes(params: int, precision: str, layout: Layout, reference: bool = True) -> dict[str, int]:
    """Bytes of weights, gradient buffer, optimizer state (masters + Adam) and reference for ``params``.

    ``reference``: False for a reference-free loss (SimPO, ORPO), which keeps no reference copy.
    """
    weight = 4 if precision == "fp32" else 2
    optimizer = 8 if precision == "fp32" else 12  # Adam m, v (+ fp32 master in bf16)
    if layout.sharded_optimizer:
        optimizer_bytes = params * optimizer // layout.dp
    else:
        optimizer_bytes = params * optimizer
    parts = dict(weights=params * weight, gradients=params * 4, optimizer=optimizer_bytes,
                 reference=params * weight if reference else 0)
    parts["total"] = sum(parts.values())
    return parts


def layer_activation_bytes(shape: Shape, rows: int, seq: int, dtype_bytes: int, tp: int, recompute: str,
                           fused: bool = False) -> int:
    """Bytes one layer keeps for backward on one TP rank (see the derivation above).

    ``fused=True`` is the variant for fused kernels (transformer-engine, or an RMSNorm
    whose gain has the model's dtype, keeping its input in that dtype and 1/rms; a
    SiLU keeping only its input, so 4 T f d in the MLP): expected, not measured here.
    Without it the norms keep fp32 tensors in bf16 too: megatron's torch-norm
    fallback leaves the RMSNorm gains in fp32, so torch computes the norm in fp32.
    """
    h, f, a, g = shape.hidden, shape.ffn, shape.heads, shape.groups
    k, d, tokens = h // a, dtype_bytes, rows * seq
    if recompute == "full":
        return tokens * h * d
    norms = 2 * ((tokens * h * d if fused else 2 * tokens * h * 4) + 4 * tokens)
    matmul_inputs = 2 * tokens * h * d
    rope = 4 * seq * k * d
    attention = tokens * k * d * (3 * a + 3 * g) // tp
    lse = 4 * tokens * a // tp
    mlp = (4 if fused else 5) * tokens * f * d // tp
    total = norms + matmul_inputs + rope + attention + mlp
    return total if recompute == "selective" else total + lse


def logits_bytes(shape: Shape, rows: int, seq: int, dtype_bytes: int, tp: int,
                 chunk: int | None) -> dict[str, int]:
    """The log-prob step: bytes saved for backward, and its transient peak (logits + fp32 copy)."""
    targets, v = rows * (seq - 1), shape.padded_vocab(tp) // tp
    if chunk is None:
        return dict(saved=4 * targets * v + 9 * targets, peak=(4 + dtype_bytes) * targets * v)
    return dict(saved=targets * shape.hidden * dtype_bytes + 16 * targets,
                peak=(4 + dtype_bytes) * min(chunk, targets) * v)


def activation_bytes(shape: Shape, rows: int, seq: int, dtype_bytes: int, layout: Layout, recompute: str,
                     chunk: int | None, fused: bool = False) -> dict[str, int]:
    """Saved-for-backward bytes of one rank at the end of the forward, and peaks over the step.

    ``forward`` is what the measured forward saves (layers x micro-batches in flight
    + embedding + head); ``saved_peak`` the most saved bytes alive at once (with
    full recompute, backward recomputes a layer after the head's are freed);
    ``peak`` also counts the log-prob step's transient logits (:func:`logits_bytes`),
    which are not saved: it is the activation term of the projection.
    """
    tokens = rows * seq
    per_layer = layer_activation_bytes(shape, rows, seq, dtype_bytes, layout.tp, recompute, fused)
    stage_layers = shape.layers // layout.pp
    in_flight = layout.pp  # 1F1B: the first stage holds PP micro-batches
    layers = per_layer * stage_layers * in_flight
    if recompute == "full":
        layers += 4 * seq * (shape.hidden // shape.heads)  # one fp32 RoPE table, shared
    embedding = 8 * tokens
    logits = logits_bytes(shape, rows, seq, dtype_bytes, layout.tp, chunk)
    final_norm = tokens * shape.hidden * dtype_bytes if fused else 2 * tokens * shape.hidden * 4
    head = final_norm + 4 * tokens + logits["saved"]
    if chunk is None:
        head += tokens * shape.hidden * dtype_bytes  # the output layer's input
    forward = layers + embedding + head if layout.pp == 1 else max(layers + embedding, per_layer * stage_layers + head)
    recomputed = 0
    if recompute == "full":
        recomputed = layer_activation_bytes(shape, rows, seq, dtype_bytes, layout.tp, "none", fused)
    # The logits' transient (whole: logits and their fp32 copy) exists at the end of the
    # forward, the recomputed layer in backward, after the head's tensors are freed.
    in_backward = forward - head + recomputed
    return dict(forward=forward, saved_peak=max(forward, in_backward),
                peak=max(forward - logits["saved"] + logits["peak"], in_backward),
                logits_saved=logits["saved"], logits_peak=logits["peak"])


# ------------------------------------------------------------------------------------------------------ projection
LLAMA3_8B = Shape(layers=32, hidden=4096, ffn=14336, heads=32, groups=8, vocab=128256)
LLAMA3_70B = Shape(layers=80, hidden=8192, ffn=28672, heads=64, groups=8, vocab=128256)
GPU_GIB = 80
# What a rank may plan for: CUDA context, NCCL buffers, allocator fragmentation and
# the temporaries the formula leaves out (gradient all-reduce buckets, optimizer
# step temporaries) take the rest.
USABLE_FRACTION = 0.9

_8B_LAYOUTS = (Layout(tp=1, dp=8, sharded_optimizer=True), Layout(tp=2, dp=4, sharded_optimizer=True), Layout(tp=8))
_70B_NODE_LAYOUTS = (Layout(tp=8), Layout(tp=4, pp=2), Layout(tp=2, pp=4))
PROJECTIONS = [
    # (model name, shape, layout, recompute, log-prob chunk); micro-batch 1 pair, seq 4096, bf16
    *(("8B", LLAMA3_8B, layout, recompute, 2048) for layout in _8B_LAYOUTS for recompute in ("selective", "full")),
    ("8B", LLAMA3_8B, Layout(tp=2, dp=4, sharded_optimizer=True), "selective", None),
    ("8B", LLAMA3_8B, Layout(tp=1, dp=8), "full", 2048),
    ("70B", LLAMA3_70B, Layout(tp=8), "selective", 2048),
    *(("70B", LLAMA3_70B, layout, "full", 2048) for layout in _70B_NODE_LAYOUTS),
    # More than one node of 8:
    ("70B", LLAMA3_70B, Layout(tp=8, pp=2), "full", 2048),
    ("70B", LLAMA3_70B, Layout(tp=8, pp=4), "full", 2048),
    ("70B", LLAMA3_70B, Layout(tp=8, pp=2, dp=2, sharded_optimizer=True), "full", 2048),
    ("70B", LLAMA3_70B, Layout(tp=8, pp=2, dp=4, sharded_optimizer=True), "full", 2048),
]


def project(shape: Shape, layout: Layout, recompute: str, chunk: int | None, seq: int = 4096,
            rows: int = 2) -> dict:
    """GiB per GPU of bf16 DPO with a resident bf16 reference (formula only).

    ``activations`` is the formula as measured on this CPU path; ``activations_fused``
    its fused-kernel variant (what CUDA RMSNorm/SiLU kernels should save, unmeasured).
    ``fits`` uses the measured-path total; ``fits_host_reference`` the same without the
    2 bytes/param of the reference (the library keeps it in host memory today).
    """
    params = params_per_rank(shape, layout)
    static = static_bytes(params, "bf16", layout)
    act = activation_bytes(shape, rows, seq, 2, layout, recompute, chunk)
    fused = activation_bytes(shape, rows, seq, 2, layout, recompute, chunk, fused=True)
    total = static["total"] + act["peak"]
    budget = USABLE_FRACTION * GPU_GIB * GIB
    return dict(params_per_rank=params, static_gib=static["total"] / GIB, reference_gib=static["reference"] / GIB,
                activations_gib=act["peak"] / GIB, activations_fused_gib=fused["peak"] / GIB,
                total_gib=total / GIB, total_fused_gib=(static["total"] + fused["peak"]) / GIB,
                fits=total <= budget, fits_fused=static["total"] + fused["peak"] <= budget,
                fits_host_reference=total - static["reference"] <= budget,
                gpus=layout.tp * layout.pp * layout.dp)


# ------------------------------------------------------------------------------------------------- configurations
@dataclass(frozen=True)
class Config:
    name: str
    precision: str = "bf16"
    optimizer: str = "adamw"
    recompute: str = "none"
    chunk: int | None = None
    procs: int = 1
    loss: str = "dpo"


CONFIGS = [
    Config("fp32", precision="fp32"),
    Config("fp32-chunk", precision="fp32", chunk=256),
    Config("fp32-simpo", precision="fp32", loss="simpo"),
    Config("bf16"),
    Config("bf16-chunk", chunk=256),
    Config("bf16-selective", recompute="selective"),
    Config("bf16-full", recompute="full"),
    Config("bf16-full-chunk", recompute="full", chunk=256),
    Config("dp2-fp32-replicated", precision="fp32", chunk=256, procs=2),
    Config("dp2-fp32-sharded", precision="fp32", optimizer="distributed_fused_adam", chunk=256, procs=2),
    Config("dp2-bf16-replicated", chunk=256, procs=2),
    Config("dp2-bf16-sharded", optimizer="distributed_fused_adam", chunk=256, procs=2),
]


# Model shape (RMSNorm, SwiGLU, RoPE, untied output layer) and batch: every sequence is exactly
# seq_length tokens, one micro-batch of micro_batch_size pairs per step.
SIZE_ARGUMENTS = dict(num_layers=4, hidden_size=256, ffn_hidden_size=768, num_attention_heads=8, num_query_groups=4,
                      vocab_size=32000, seq_length=512, micro_batch_size=2)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, default in SIZE_ARGUMENTS.items():
        parser.add_argument(f"--{flag.replace('_', '-')}", type=int, default=default)
    parser.add_argument("--only", nargs="*", help=f"configurations to run (default all): "
                                                  f"{' '.join(c.name for c in CONFIGS)}")
    parser.add_argument("--output", default=str(BENCH_DIR / "results" / "bench_memory.json"),
                        help="JSON file for the measurements, formula and projection ('' to skip)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # a configuration's name: run it here
    parser.add_argument("--result-dir", help=argparse.SUPPRESS)
    return parser.parse_args()


def shape_of(args: argparse.Namespace) -> Shape:
    return Shape(args.num_layers, args.hidden_size, args.ffn_hidden_size, args.num_attention_heads,
                 args.num_query_groups, args.vocab_size)


# ---------------------------------------------------------------------------------------------------- measurement
def model_config(args: argparse.Namespace, config: Config, dp: int):
    from omegaconf import OmegaConf

    full = config.recompute == "full"
    return OmegaConf.create(dict(
        num_layers=args.num_layers, hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads, num_query_groups=args.num_query_groups,
        encoder_seq_length=args.seq_length, normalization="rmsnorm", activation="swiglu",
        position_embedding_type="rope", bias=False, share_embeddings_and_output_weights=False,
        make_vocab_size_divisible_by=128, precision=32 if config.precision == "fp32" else "bf16",
        micro_batch_size=args.micro_batch_size, global_batch_size=args.micro_batch_size * dp,
        activations_checkpoint_granularity=None if config.recompute == "none" else config.recompute,
        activations_checkpoint_method="uniform" if full else None,
        activations_checkpoint_num_layers=1 if full else None,
        optim=dict(name=config.optimizer, lr=1e-5, weight_decay=0.01),
        dpo=dict(ref_policy_kl_penalty=0.1, log_prob_chunk_size=config.chunk, preference_loss=config.loss),
    ))


def full_length_pairs(count: int, seq: int, vocab: int, seed: int) -> list[dict]:
    """Pairs whose both sides are exactly ``seq`` tokens (no padding: the token count is known)."""
    gen = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(count):
        prompt = torch.randint(1, vocab, (seq // 4,), generator=gen)
        item = {"chosen_reward": 1.0, "rejected_reward": 0.0}
        for side in ("chosen", "rejected"):
            response = torch.randint(1, vocab, (seq - len(prompt) - 1,), generator=gen)
            tokens = torch.cat([prompt, response, torch.tensor([EOS])])
            labels = tokens.clone()
            labels[: len(prompt)] = -100
            item.update({side: tokens, f"{side}_labels": labels, f"{side}_length": seq})
        items.append(item)
    return items


def _storage_key(tensor: torch.Tensor) -> tuple[str, int]:
    return str(tensor.device), tensor.untyped_storage().data_ptr()


def _tensors_in(obj, seen: set, depth: int = 0):
    """Every tensor reachable from ``obj`` through dicts, sequences, modules and object attributes."""
    if id(obj) in seen or depth > 6:
        return
    seen.add(id(obj))
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, torch.nn.Module):
        yield from obj.parameters()
        yield from obj.buffers()
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors_in(value, seen, depth + 1)
    elif isinstance(obj, (list, tuple, set)):
        for value in obj:
            yield from _tensors_in(value, seen, depth + 1)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        for value in vars(obj).values():
            yield from _tensors_in(value, seen, depth + 1)


def reference_tensors(model) -> list[torch.Tensor]:
    """The tensors of the frozen reference, whatever holds them (a dict today, possibly an object later):
    everything reachable from the model's attributes whose name mentions the reference."""
    seen: set = {id(model.model)}
    tensors = []
    for name, value in vars(model).items():
        if "ref" in name.lower():
            tensors.extend(_tensors_in(value, seen))
    return tensors


class StorageCounter:
    """Bytes of distinct storages, each counted under the first category that claims it."""

    def __init__(self):
        self.keys: set = set()
        self.bytes: dict[str, int] = {}

    def add(self, category: str, tensors) -> None:
        total = 0
        for tensor in tensors:
            if tensor is None or not torch.is_tensor(tensor) or tensor.numel() == 0:
                continue
            key = _storage_key(tensor)
            if key not in self.keys:
                self.keys.add(key)
                total += tensor.untyped_storage().nbytes()
        self.bytes[category] = self.bytes.get(category, 0) + total


def static_tensors(model, optimizer) -> dict[str, list]:
    params = [p for chunk in model.model for p in chunk.parameters()]
    buffers = [b for chunk in model.model for b in getattr(chunk, "buffers", [])]
    params += [b.param_data for b in buffers if getattr(b, "param_data", None) is not None]
    grads = [b.grad_data for b in buffers if getattr(b, "grad_data", None) is not None]
    state = [v for s in optimizer.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.ndim > 0]
    masters = [p for group in optimizer.optimizer.param_groups for p in group["params"]]
    return dict(weights=params, gradients=grads, optimizer=state + masters, reference=reference_tensors(model))


class _Saved:
    """A saved tensor in the tracker's hands; releasing it (autograd freeing the node) updates the count."""

    __slots__ = ("tensor", "tracker", "key")

    def __init__(self, tensor, tracker, key):
        self.tensor, self.tracker, self.key = tensor, tracker, key

    def __del__(self):
        self.tracker.release(self.key)


class SavedTensorTracker:
    """``saved_tensors_hooks`` that count the distinct storages autograd keeps for backward.

    ``forward_bytes``: storages saved before backward first reads one (the forward's
    total); ``peak_bytes``: the most alive at once over the whole step (recomputation
    in backward included). Storages in ``exclude`` (parameters, gradient buffers) are not counted.
    """

    def __init__(self, exclude: set):
        self.exclude = exclude
        self.live: dict = {}
        self.live_bytes = self.peak_bytes = self.forward_bytes = 0
        self.forward_keys: set = set()
        self.in_forward = True

    def pack(self, tensor):
        if tensor.numel() == 0:
            return tensor
        key = _storage_key(tensor)
        if key in self.exclude:
            return tensor
        nbytes = tensor.untyped_storage().nbytes()
        if key in self.live:
            self.live[key][0] += 1
        else:
            self.live[key] = [1, nbytes]
            self.live_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        if self.in_forward and key not in self.forward_keys:
            self.forward_keys.add(key)
            self.forward_bytes += nbytes
        return _Saved(tensor, self, key)

    def unpack(self, packed):
        self.in_forward = False
        return packed.tensor if isinstance(packed, _Saved) else packed

    def release(self, key) -> None:
        entry = self.live[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.live_bytes -= entry[1]
            del self.live[key]

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


def run_worker(args: argparse.Namespace) -> None:
    """One configuration in this process (rank of a torchrun when it has 2 processes)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from nemo_dpo.data.collate import dpo_custom_collate
    from nemo_dpo.models.nlp.gpt.architecture import precision_dtype
    from nemo_dpo.models.nlp.gpt.megatron_gpt_dpo_model import MegatronGPTDPOModel
    from nemo_dpo.optim.optimizer import build_optimizer
    from nemo_dpo.parallel.device import accelerator_device
    from nemo_dpo.parallel.initialize import ParallelLayout, destroy_parallel, initialize_parallel

    config = next(c for c in CONFIGS if c.name == args.worker)
    local_procs = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_procs))
    initialize_parallel(ParallelLayout(1, 1), seed=1234)
    # The interpreter, torch, megatron and the process groups: what the step's growth starts from.
    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    device = accelerator_device()
    on_gpu = device.type == "cuda"
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    cfg = model_config(args, config, dp)
    model = MegatronGPTDPOModel(cfg, args.vocab_size)
    optimizer = build_optimizer(model.model, cfg.optim, precision_dtype(cfg.precision))

    mbs = args.micro_batch_size
    items = full_length_pairs(mbs * dp, args.seq_length, args.vocab_size, seed=0)
    batch = dpo_custom_collate(items[dp_rank * mbs:(dp_rank + 1) * mbs], eos_id=EOS)
    gpu_peaks = {}
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        gpu_peaks["before_step"] = torch.cuda.memory_allocated()
    if model.reference_policy is not None:  # a reference-free loss runs no reference pass
        batch["ref_policy_log_probs_chosen"], batch["ref_policy_log_probs_rejected"] = (
            model.get_ref_policy_logprobs(batch).chunk(2))
    if on_gpu:
        torch.cuda.synchronize()
        gpu_peaks["reference"] = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()

    optimizer.zero_grad()
    model.prepare_for_training_step()
    static = static_tensors(model, optimizer)
    exclude = {_storage_key(t) for key in ("weights", "gradients") for t in static[key]}
    tracker = SavedTensorTracker(exclude)
    with tracker.hooks():
        loss, _ = model.get_loss_and_metrics(batch, forward_only=False)
    updated, grad_norm, _ = optimizer.step(clip_grad=1.0)
    if not updated:
        raise RuntimeError(f"non-finite gradient norm {grad_norm}")
    if on_gpu:
        torch.cuda.synchronize()
        gpu_peaks["train"] = torch.cuda.max_memory_allocated()

    # After the step: Adam's moments exist only once it has run.
    counter = StorageCounter()
    for category, tensors in static_tensors(model, optimizer).items():
        counter.add(category, tensors)
    params = sum(p.numel() for chunk in model.model for p in chunk.module.parameters())
    record = dict(
        config=dataclasses.asdict(config), rank=dist.get_rank(), dp=dp, device=str(device),
        params=params, static=counter.bytes, state_bytes=optimizer.state_bytes(),
        activations_forward=tracker.forward_bytes, activations_peak=tracker.peak_bytes,
        peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
        baseline_rss=baseline_rss,
        gpu_peaks=gpu_peaks, loss=loss, threads=torch.get_num_threads(),
    )
    Path(args.result_dir, f"{config.name}.rank{dist.get_rank()}.json").write_text(json.dumps(record))
    destroy_parallel()


def launch(config: Config, args: argparse.Namespace, result_dir: str) -> list[dict]:
    """Run ``config`` in fresh process(es) and return every rank's record."""
    script = [str(Path(__file__).resolve()), "--worker", config.name, "--result-dir", result_dir]
    for flag in SIZE_ARGUMENTS:
        script += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    if config.procs == 1:
        command = [sys.executable, *script]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(config.procs), *script]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{config.name} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return [json.loads(Path(result_dir, f"{config.name}.rank{r}.json").read_text()) for r in range(config.procs)]


# -------------------------------------------------------------------------------------------------------- report
def formula_for(record: dict, args: argparse.Namespace) -> dict:
    config = Config(**record["config"])
    shape = shape_of(args)
    layout = Layout(dp=record["dp"], sharded_optimizer=config.optimizer == "distributed_fused_adam")
    dtype_bytes = 4 if config.precision == "fp32" else 2
    rows = 2 * args.micro_batch_size
    static = static_bytes(params_per_rank(shape, layout), config.precision, layout,
                          reference=config.loss not in ("simpo", "orpo"))
    act = activation_bytes(shape, rows, args.seq_length, dtype_bytes, layout, config.recompute, config.chunk)
    return dict(static=static, activations_forward=act["forward"], activations_peak=act["saved_peak"],
                step_peak=static["total"] + act["peak"],
                logits_saved=act["logits_saved"], logits_peak=act["logits_peak"])


def error(measured: float, formula: float) -> float:
    return (formula - measured) / measured if measured else 0.0


def comparison_rows(records: list[dict], args: argparse.Namespace) -> list[dict]:
    rows = []
    for record in records:
        formula = formula_for(record, args)
        static = dict(record["static"])
        static["total"] = sum(static.values())
        # The live peak counts only saved tensors: the whole-logits transient is not saved.
        rows.append(dict(
            name=record["config"]["name"], rank=record["rank"], params=record["params"],
            static_measured=static, static_formula=formula["static"],
            activations_forward=(record["activations_forward"], formula["activations_forward"]),
            activations_peak=(record["activations_peak"], formula["activations_peak"]),
            peak_rss=record["peak_rss"], rss_growth=record["peak_rss"] - record["baseline_rss"],
            step_peak_formula=formula["step_peak"], gpu_peaks=record["gpu_peaks"], loss=record["loss"],
            state_bytes=record["state_bytes"],
        ))
    return rows


def mib(value: float) -> str:
    return f"{value / 2**20:,.1f}"


def measured_table(rows: list[dict]) -> str:
    lines = [
        "| configuration | static MiB measured / formula (err) | of which optimizer | activations saved by "
        "forward MiB (err) | live saved peak MiB (err) | peak RSS MiB | RSS growth over start-up MiB / "
        "static + activation peak with logits transient (formula) | GPU max allocated reference / train MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sm, sf = r["static_measured"], r["static_formula"]
        fwd, peak = r["activations_forward"], r["activations_peak"]
        gpu = " / ".join(mib(r["gpu_peaks"][k]) for k in ("reference", "train")) if r["gpu_peaks"] else "-"
        lines.append(
            f"| {r['name']} (rank {r['rank']}) | {mib(sm['total'])} / {mib(sf['total'])} "
            f"({error(sm['total'], sf['total']):+.1%}) | {mib(sm['optimizer'])} / {mib(sf['optimizer'])} "
            f"({error(sm['optimizer'], sf['optimizer']):+.1%}) | {mib(fwd[0])} / {mib(fwd[1])} "
            f"({error(*fwd):+.1%}) | {mib(peak[0])} / {mib(peak[1])} ({error(*peak):+.1%}) | {mib(r['peak_rss'])} "
            f"| {mib(r['rss_growth'])} / {mib(r['step_peak_formula'])} | {gpu} |"
        )
    return "\n".join(lines)


def logits_table(rows: list[dict], args: argparse.Namespace) -> str:
    """Whole minus chunked log-probs, same precision: measured saved bytes and RSS vs the formula."""
    by_name = {r["name"]: r for r in rows if r["rank"] == 0}
    shape, rows_per_mb = shape_of(args), 2 * args.micro_batch_size
    lines = ["| pair | saved: whole - chunked MiB measured / formula (err) | peak RSS whole - chunked MiB "
             "| formula transient whole / chunk MiB |", "|---|---|---|---|"]
    for whole, chunked, dtype_bytes in (("fp32", "fp32-chunk", 4), ("bf16", "bf16-chunk", 2),
                                        ("bf16-full", "bf16-full-chunk", 2)):
        if whole not in by_name or chunked not in by_name:
            continue
        w, c = by_name[whole], by_name[chunked]
        measured = w["activations_forward"][0] - c["activations_forward"][0]
        formula = w["activations_forward"][1] - c["activations_forward"][1]
        whole_l = logits_bytes(shape, rows_per_mb, args.seq_length, dtype_bytes, 1, None)
        chunk_l = logits_bytes(shape, rows_per_mb, args.seq_length, dtype_bytes, 1, 256)
        lines.append(f"| {whole} vs {chunked} | {mib(measured)} / {mib(formula)} ({error(measured, formula):+.1%}) "
                     f"| {mib(w['peak_rss'] - c['peak_rss'])} | {mib(whole_l['peak'])} / {mib(chunk_l['peak'])} |")
    return "\n".join(lines)


def projection_rows() -> list[dict]:
    rows = []
    for name, shape, layout, recompute, chunk in PROJECTIONS:
        result = project(shape, layout, recompute, chunk)
        rows.append(dict(model=name, layout=dataclasses.asdict(layout), recompute=recompute, chunk=chunk, **result))
    return rows


def projection_table(rows: list[dict]) -> str:
    lines = ["| model | GPUs | TP | PP | DP | optimizer | recompute | log-probs | params/GPU | static GiB "
             "(of which reference) | activations GiB (fused kernels) | total GiB/GPU (fused kernels) "
             "| fits 80 GB | fits with fused kernels | fits, reference in host memory |", "|" + "---|" * 15]
    yes_no = {True: "yes", False: "no"}
    for r in rows:
        lay = r["layout"]
        lines.append(
            f"| {r['model']} | {r['gpus']} | {lay['tp']} | {lay['pp']} | {lay['dp']} "
            f"| {'sharded' if lay['sharded_optimizer'] else 'replicated'} | {r['recompute']} "
            f"| {'chunk ' + str(r['chunk']) if r['chunk'] else 'whole'} | {r['params_per_rank'] / 1e9:.2f} B "
            f"| {r['static_gib']:.1f} ({r['reference_gib']:.1f}) | {r['activations_gib']:.1f} "
            f"({r['activations_fused_gib']:.1f}) | {r['total_gib']:.1f} ({r['total_fused_gib']:.1f}) "
            f"| {yes_no[r['fits']]} | {yes_no[r['fits_fused']]} | {yes_no[r['fits_host_reference']]} |"
        )
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    if args.worker:
        run_worker(args)
        return
    names = args.only or [c.name for c in CONFIGS]
    unknown = set(names) - {c.name for c in CONFIGS}
    if unknown:
        raise SystemExit(f"unknown configuration(s) {sorted(unknown)}; valid: {[c.name for c in CONFIGS]}")
    records = []
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as result_dir:
        for config in (c for c in CONFIGS if c.name in names):
            print(f"running {config.name} ({config.procs} process{'es' if config.procs > 1 else ''})", flush=True)
            records.extend(launch(config, args, result_dir))
    rows = comparison_rows(records, args)
    projection = projection_rows()
    shape = shape_of(args)
    print(f"\nshape {shape}, seq {args.seq_length}, micro-batch {args.micro_batch_size} pairs "
          f"({2 * args.micro_batch_size} rows), device {records[0]['device']}\n")
    print(measured_table(rows), "\n", logits_table(rows, args), "\n", projection_table(projection), sep="\n")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(dict(
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            torch=torch.__version__, shape=dataclasses.asdict(shape), seq_length=args.seq_length,
            micro_batch_size=args.micro_batch_size, measured=rows, projection=projection,
        ), indent=1) + "\n")


if __name__ == "__main__":
    main()
