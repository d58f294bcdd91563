"""Writes NeMo Aligner's packed DPO ``.npy`` files from nemo-dpo's JSONL preference pairs.

    python scripts/prepare_packed_dpo_dataset.py --data train.jsonl --tokenizer MODEL_OR_TOKENIZER \\
        --seq_length 1024 --pack_sizes 2048 4096 --output_dir packed/ [--packing_algorithm first_fit_shuffle] \\
        [--seed 1234]

One file per pack size, ``OUTPUT_DIR/packed_{pack_size}_seed{seed}.npy``, the
names and format NeMo Aligner's ``examples/nlp/data/dpo/prepare_packed_dpo_dataset.py``
writes (see :mod:`nemo_dpo.data.packed_npy`); train on it with
``model.data.data_impl=packed_jsonl model.data.data_prefix=...npy``.

1. The JSONL is tokenised exactly as training on it does (``DPOModelDataset``: the
   same prompt/response split, chat template, ``--append_eod``, over-length policy
   at ``--seq_length``, dropped identical pairs).
2. Each pair's chosen and rejected sequences are concatenated (the pair is packed as
   a whole, so ``--pack_sizes`` must be at least twice ``--seq_length`` to fit any pair).
3. Pairs are put into packs of at most ``pack_size`` tokens: ``first_fit_shuffle``
   (first fit in an order shuffled by ``--seed``; NeMo's recommended default) or
   ``first_fit_decreasing`` (largest first: fuller packs, short pairs together).

``--tokenizer`` is a tokenizer file or folder, or a model folder holding ``tokenizer/``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from omegaconf import OmegaConf

from nemo_dpo.data import DPOModelDataset, load_tokenizer
from nemo_dpo.data.packed_npy import PACKING_ALGORITHMS, make_pack, pack_pairs, save_packed_npy


def _tokenizer(path: Path):
    return load_tokenizer(path / "tokenizer" if (path / "tokenizer").is_dir() else path)


def prepare(data: Path, tokenizer, seq_length: int, pack_sizes: list[int], output_dir: Path,
            packing_algorithm: str = "first_fit_shuffle", seed: int = 1234, append_eod: bool = False,
            over_length_policy: str = "drop") -> list[Path]:
    """Write one packed file per pack size; their paths."""
    cfg = OmegaConf.create({"data": {"append_eod": append_eod, "over_length_policy": over_length_policy}})
    dataset = DPOModelDataset(cfg, tokenizer, "packing_dataset", data, None, None, seq_length, seed,
                              pad_chosen_rejected_to_max=False)
    items = [dataset[i] for i in range(len(dataset))]
    sizes = [item["chosen_length"] + item["rejected_length"] for item in items]
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for pack_size in pack_sizes:
        bins = pack_pairs(sizes, pack_size, packing_algorithm, seed)
        path = output_dir / f"packed_{pack_size}_seed{seed}.npy"
        save_packed_npy(path, [make_pack([items[i] for i in members]) for members in bins])
        filled = sum(sizes) / (len(bins) * pack_size)
        print(f"{path}: {len(items)} pairs in {len(bins)} packs of at most {pack_size} tokens ({filled:.1%} filled)")
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="JSONL preference pairs")
    parser.add_argument("--tokenizer", type=Path, required=True, help="tokenizer file/folder or model folder")
    parser.add_argument("--seq_length", type=int, required=True,
                        help="longest sequence (prompt + response), NeMo's model.data.seq_length")
    parser.add_argument("--pack_sizes", type=int, nargs="+", required=True, help="tokens per pack (one file each)")
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--packing_algorithm", choices=PACKING_ALGORITHMS, default="first_fit_shuffle")
    parser.add_argument("--seed", type=int, default=1234, help="shuffle seed, also in the file name (model.seed)")
    parser.add_argument("--append_eod", action="store_true", help="model.data.append_eod")
    parser.add_argument("--over_length_policy", choices=("drop", "truncate_response"), default="drop")
    args = parser.parse_args(argv)
    prepare(args.data, _tokenizer(args.tokenizer), args.seq_length, args.pack_sizes, args.output_dir,
            args.packing_algorithm, args.seed, args.append_eod, args.over_length_policy)


if __name__ == "__main__":
    main()
