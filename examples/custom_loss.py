"""Your own preference loss without forking nemo-dpo: three routes (docs/losses.md).

    python examples/custom_loss.py [log dir]   # each route trains 2 steps of the embedded default model

(a) import path: ``model.dpo.preference_loss: my_module:my_loss`` (any importable function);
(b) a name: ``@register_loss("name")``, then ``model.dpo.preference_loss: name``;
(c) a subclass overriding ``MegatronGPTDPOModel.loss_func`` (NeMo Aligner's hook), given to ``train``.
"""

import sys
import tempfile

import torch
import torch.nn.functional as F

from nemo_dpo.losses import register_loss
from nemo_dpo.models.nlp.gpt.megatron_gpt_dpo_model import MegatronGPTDPOModel
from nemo_dpo.training import compose_config, train


# (a) A loss takes the micro-batch's PreferenceLossInputs (per-pair summed log-probs, lengths,
# rewards, beta) and the settings, and returns one value per pair.
def margin_dpo(inputs, settings):
    """DPO asking for a reward margin of at least 1."""
    chosen, rejected = inputs.logratios("margin_dpo")
    return -F.logsigmoid(inputs.beta * (chosen - rejected) - 1.0)


# (b) The same interface under a name; reference_free=True: the reference pass is never run.
@register_loss("mean_logp_margin", reference_free=True)
def mean_logp_margin(inputs, settings):
    """SimPO without its margin: the policy's per-token mean log-prob of chosen over rejected."""
    chosen_len, rejected_len = inputs.lengths("mean_logp_margin")
    margin = inputs.policy_chosen_logps / chosen_len - inputs.policy_rejected_logps / rejected_len
    return -F.logsigmoid(inputs.beta * margin)


# (c) NeMo Aligner's hook: per-token log-probs in, (mean loss, accuracy) out.
class HingeDPOModel(MegatronGPTDPOModel):
    def loss_func(self, pi_logprobs, ref_logprobs, labels, gt_rewards, cu_seqlens=None, average_log_probs=False,
                  logratios=None, **_):
        if logratios is None:
            logratios = self.get_reduced_masked_logps(pi_logprobs - ref_logprobs, labels, cu_seqlens, average_log_probs)
        chosen, rejected = logratios.chunk(2)
        loss = torch.relu(1.0 - self.dpo.ref_policy_kl_penalty * (chosen - rejected)).mean()
        return loss, (chosen > rejected).float().mean()


def main(log_dir: str, steps: int = 2) -> dict:
    """Train each route ``steps`` steps; returns each route's log folder."""
    short = [f"trainer.dpo.max_steps={steps}", f"trainer.dpo.val_check_interval={steps}",
             "trainer.dpo.limit_val_batches=1", "exp_manager.create_checkpoint_callback=False"]
    routes = {
        "import": ([f"model.dpo.preference_loss={margin_dpo.__module__}:margin_dpo"], None),
        "register": (["model.dpo.preference_loss=mean_logp_margin"], None),
        "subclass": ([], HingeDPOModel),
    }
    return {name: train(compose_config([f"exp_manager.explicit_log_dir={log_dir}/{name}", *short, *overrides]),
                        model_cls=model_cls)
            for name, (overrides, model_cls) in routes.items()}


if __name__ == "__main__":
    print(main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="custom_loss_")))
