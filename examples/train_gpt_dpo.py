"""DPO training of a GPT model, configured by conf/gpt_dpo.yaml (Hydra).

    python examples/train_gpt_dpo.py                                   # embedded default, one process
    torchrun --nproc-per-node 2 examples/train_gpt_dpo.py model.tensor_model_parallel_size=2
    srun python examples/train_gpt_dpo.py trainer.num_nodes=2 trainer.devices=8 ...  # Slurm, see train_gpt_dpo.sbatch
    python examples/train_gpt_dpo.py pretrained_checkpoint.restore_from_path=/path/to/model \\
        model.data.data_prefix.train=train.jsonl model.data.data_prefix.validation=val.jsonl

The job itself is :func:`nemo_dpo.training.train`; this page only hands it Hydra's config. The
installed command ``nemo-dpo-train`` runs the same job with the same arguments, reading the copy of
this config shipped in the package (nemo_dpo/conf/gpt_dpo.yaml, kept identical by the tests).
"""

import hydra
from omegaconf import DictConfig

from nemo_dpo.training import train


@hydra.main(config_path="../conf", config_name="gpt_dpo", version_base=None)
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
