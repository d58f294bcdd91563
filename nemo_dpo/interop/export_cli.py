"""Export a trained model as a Hugging Face folder that ``transformers`` and serving engines load.

    python -m nemo_dpo.interop.export_cli --checkpoint results/gpt_dpo/checkpoints/final_model --out my-model-hf
    torchrun --nproc-per-node 2 -m nemo_dpo.interop.export_cli --checkpoint ... --out ... --tp 2

``--checkpoint`` is anything :func:`nemo_dpo.interop.open_pretrained`
reads (a nemo-dpo model folder, a ``.nemo`` archive, even an HF folder). The
model is built at ``--tp``/``--pp`` (the processes left over are data-parallel
copies), loaded, and gathered to rank 0 one tensor at a time; big models need
enough processes to hold them, not one host with all the memory.

A LoRA checkpoint (a folder with ``lora.json``: a LoRA run's checkpoint or
``final_model``) is loaded onto its base model (recorded there; ``--base``
overrides it). With ``--merge-lora`` the adapters are folded into the weights
and a full Hugging Face folder is written; without it, a PEFT adapter folder
(``adapter_config.json``, ``adapter_model.safetensors``) for
``peft.PeftModel.from_pretrained`` on the Hugging Face base.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from omegaconf import OmegaConf

from nemo_dpo.models.nlp.gpt.architecture import DTYPES


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="nemo-dpo model folder, .nemo archive or HF folder")
    parser.add_argument("--out", required=True, help="Hugging Face folder to write")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size to load the model at")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to load the model at")
    parser.add_argument("--dtype", choices=["auto", *sorted(DTYPES)], default="auto",
                        help="dtype of the written weights (auto: the precision the model is loaded in, fp32)")
    parser.add_argument("--load-dtype", choices=sorted(DTYPES), default="fp32",
                        help="precision to build the model in while exporting (bf16 halves the memory)")
    parser.add_argument("--max-shard-size", type=float, default=5.0, help="GiB per safetensors file")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder to use instead of the checkpoint's")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--merge-lora", action="store_true",
                        help="LoRA checkpoint: write the base with the adapters merged (default: a PEFT adapter folder)")
    parser.add_argument("--base", default=None, help="LoRA checkpoint: the base model (default: the one it records)")
    return parser.parse_args(argv)


def export(args: argparse.Namespace) -> Path:
    from nemo_dpo.checkpoint.adapters import is_adapter_folder, load_adapters, read_lora_config
    from nemo_dpo.checkpoint.pretrained import DEFAULT_MODEL_DIR
    from nemo_dpo.interop import open_pretrained
    from nemo_dpo.interop.hf import export_hf
    from nemo_dpo.interop.hf.peft_adapter import export_peft_adapter
    from nemo_dpo.models.nlp.gpt.builder import build_gpt_model
    from nemo_dpo.models.nlp.gpt.lora import merge_adapters
    from nemo_dpo.parallel.initialize import ParallelLayout, initialize_parallel

    lora = read_lora_config(args.checkpoint) if is_adapter_folder(args.checkpoint) else None
    if lora is None and (args.merge_lora or args.base):
        raise ValueError(f"--merge-lora and --base need a LoRA checkpoint; {args.checkpoint} has no lora.json")
    initialize_parallel(ParallelLayout(args.tp, args.pp))
    base = (args.base or lora["base_checkpoint"] or DEFAULT_MODEL_DIR) if lora else args.checkpoint
    source = open_pretrained(base, tokenizer_path=args.tokenizer)
    cfg = OmegaConf.create({**source.architecture, "precision": args.load_dtype})
    if lora:
        cfg.peft = {"peft_scheme": "lora", "lora_tuning": lora["lora_tuning"]}
    if cfg.get("encoder_seq_length") is None and cfg.get("max_position_embeddings") is None:
        cfg.encoder_seq_length = 2048  # only sizes learned position embeddings, which then are in the config
    chunks = build_gpt_model(cfg, source.vocab_size)
    source.load_weights(chunks)
    if lora:
        load_adapters(chunks, args.checkpoint)
        if not args.merge_lora:
            return export_peft_adapter(chunks, source.architecture, source.vocab_size, args.out,
                                       base_model=str(base), dtype=DTYPES.get(args.dtype), overwrite=args.overwrite)
        merge_adapters(chunks)
    return export_hf(
        chunks, source.architecture, source.vocab_size, args.out,
        tokenizer_dir=source.tokenizer_dir, dtype=DTYPES.get(args.dtype),
        max_shard_bytes=int(args.max_shard_size * 2**30), overwrite=args.overwrite,
    )


def main(argv=None) -> None:
    logging.getLogger("megatron").setLevel(logging.WARNING)
    args = parse_args(argv)
    from nemo_dpo.parallel.collectives import is_rank0
    from nemo_dpo.parallel.initialize import destroy_parallel

    try:
        out = export(args)
        if is_rank0():
            print(f"wrote {out}", flush=True)
    finally:
        destroy_parallel()


if __name__ == "__main__":
    main()
