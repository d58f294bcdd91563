"""``step_time`` covers the whole training step, the reference forward included."""

import json

from test_train_gpt_dpo import run_in_pool

# No validation, checkpoint or TensorBoard between steps: the wall time between two step
# records is then the step itself plus logging.
STEPS = 6
RUN = [f"trainer.dpo.max_steps={STEPS}", "trainer.dpo.limit_val_batches=0",
       "exp_manager.create_checkpoint_callback=False", "exp_manager.create_tensorboard_logger=False",
       "model.global_batch_size=16", "model.micro_batch_size=8"]


def test_step_time_agrees_with_the_wall_time_between_step_records(dist_pool, tmp_path):
    run_in_pool(dist_pool, tmp_path, *RUN)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    # Sums over steps 2..N against the span from record 1 to record N: robust to one slow step.
    wall = records[-1]["wall_time"] - records[0]["wall_time"]
    timed = sum(r["train/step_time"] for r in records[1:])
    assert abs(timed - wall) <= 0.05 * wall, (timed, wall)
    # The reference forward is a real part of each step (about a third: one forward of three passes).
    reference = sum(r["train/reference_step_time"] for r in records[1:])
    assert 0.1 * timed < reference < timed, (reference, timed)
