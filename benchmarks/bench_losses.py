"""Every loss in the zoo, trained 30 steps on the embedded default model: does it learn, does it stay finite?

Each loss runs ``nemo_dpo.training.train(compose_config([...]))`` in a fresh
subprocess of this script (a crash or NaN in one run does not stop the others,
and no memory carries over), one after another, each in a temporary log folder
that is removed afterwards. From each run's ``metrics.jsonl``: the final train
loss, whether any train loss or grad norm was NaN/inf, validation accuracy and
loss at the last step, the task metric (``task/exact_match``: greedy answers to
the 400 held-out sums) before and after training, and wall seconds.

    python benchmarks/bench_losses.py                       # every loss, 30 steps
    python benchmarks/bench_losses.py --losses dpo ipo sft  # a subset
    python benchmarks/bench_losses.py --threads 2

Prints a markdown table and writes benchmarks/results/bench_losses.json.
See benchmarks/RESULTS.md for the numbers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent

# The smallest setting that makes a loss valid (the config default is refused or degenerate).
EXTRA_SETTINGS: dict[str, list[str]] = {
    "exo_pair": ["model.dpo.label_smoothing=0.001"],  # eps > 0 required; the paper's 1e-3
}
# Settings that act on every loss, benchmarked on top of dpo (docs/losses.md).
SETTINGS_WITH_DPO: dict[str, list[str]] = {
    "ld_alpha": ["model.dpo.preference_loss=dpo", "model.dpo.ld_alpha=0.5"],
    "use_weighting": ["model.dpo.preference_loss=dpo", "model.dpo.use_weighting=true"],
}


def zoo_names() -> list[str]:
    """Every registered loss name in registration order, aliases left out."""
    from nemo_dpo.losses.zoo import LOSS_ZOO

    return list(LOSS_ZOO)


def overrides_for(name: str, steps: int, val_batches: int, log_dir: str) -> list[str]:
    base = [
        f"trainer.dpo.max_steps={steps}",
        f"trainer.dpo.val_check_interval={steps}",
        f"trainer.dpo.limit_val_batches={val_batches}",
        "exp_manager.create_checkpoint_callback=False",
        f"exp_manager.explicit_log_dir={log_dir}",
    ]
    if name in SETTINGS_WITH_DPO:
        return base + SETTINGS_WITH_DPO[name]
    return base + [f"model.dpo.preference_loss={name}"] + EXTRA_SETTINGS.get(name, [])


def child(overrides: list[str]) -> None:
    """One training run (in the subprocess)."""
    from nemo_dpo.training import compose_config, train

    train(compose_config(overrides))


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def read_metrics(path: Path) -> dict:
    rows = []
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        for number, line in enumerate(lines, 1):
            try:
                rows.append(json.loads(line, parse_constant=lambda c: float(c.lower().replace("infinity", "inf"))))
            except json.JSONDecodeError:
                # A run stopped by --timeout may leave its last record half written; anything else is a bug.
                if number != len(lines):
                    raise
    train_rows = [r for r in rows if "train/loss" in r]
    val_rows = [r for r in rows if any(k.startswith("val") for k in r)]
    non_finite = any(
        key in r and not _finite(r[key]) for r in train_rows for key in ("train/loss", "train/grad_norm")
    )
    out = {
        "train_steps_logged": len(train_rows),
        "final_step": train_rows[-1]["step"] if train_rows else None,
        "final_train_loss": train_rows[-1]["train/loss"] if train_rows else None,
        "nan_or_inf": non_finite,
        "val_step": None,
        "val_acc": None,
        "val_loss": None,
        "task_exact_match": [r["task/exact_match"] for r in rows if "task/exact_match" in r],
    }
    if val_rows:
        last = val_rows[-1]
        out["val_step"] = last.get("step")
        for key, value in last.items():
            tail = key.split("/", 1)[-1]
            if tail == "acc" and key.startswith("val"):
                out["val_acc"] = value
            elif tail == "loss" and key.startswith("val"):
                out["val_loss"] = value
    return out


def run_one(name: str, args) -> dict:
    log_dir = tempfile.mkdtemp(prefix=f"bench_losses_{name}_")
    overrides = overrides_for(name, args.steps, args.val_batches, log_dir)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(overrides)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=args.timeout)
        rc, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc = "timeout"
        output = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
    seconds = time.perf_counter() - start
    result = {"loss": name, "settings": [o for o in overrides if o.startswith("model.")], "rc": rc,
              "seconds": round(seconds, 1)}
    result.update(read_metrics(Path(log_dir) / "metrics.jsonl"))
    if rc != 0:
        errors = [line for line in output.splitlines() if "Error" in line or "refused" in line.lower()]
        lines = errors or output.strip().splitlines() or ["?"]
        result["error"] = lines[-1][-300:]
    shutil.rmtree(log_dir, ignore_errors=True)
    return result


def status_of(r: dict) -> str:
    if r["rc"] == "timeout":
        return "timeout"
    if r["rc"] != 0:
        return "failed"
    return "NaN/inf" if r["nan_or_inf"] else "ok"


def _fmt(value, digits=3) -> str:
    return "-" if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else str(value))


def table(results: list[dict]) -> str:
    lines = ["| loss | setting | status | final train loss | NaN/inf | val acc (step) | val loss | exact match | s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        setting = ", ".join(s.split(".", 2)[-1] for s in r["settings"]
                            if not s.startswith("model.dpo.preference_loss=")) or "default"
        val_acc = "-" if r["val_acc"] is None else f"{r['val_acc']:.3f} ({r['val_step']})"
        task = " -> ".join(f"{value:.3f}" for value in r["task_exact_match"]) or "-"
        lines.append(f"| `{r['loss']}` | {setting} | {status_of(r)} | {_fmt(r['final_train_loss'], 4)} "
                     f"| {'yes' if r['nan_or_inf'] else 'no'} | {val_acc} | {_fmt(r['val_loss'], 4)} | {task} "
                     f"| {r['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--losses", nargs="*", help="zoo names (and/or ld_alpha, use_weighting); default: all")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--val-batches", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds before a run is stopped")
    parser.add_argument("--output", default=str(BENCH_DIR / "results" / "bench_losses.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child is not None:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        child(json.loads(args.child))
        return

    names = args.losses or zoo_names() + list(SETTINGS_WITH_DPO)
    results = []
    for name in names:
        result = run_one(name, args)
        results.append(result)
        print(f"{name}: {status_of(result)}, val acc {_fmt(result['val_acc'])}, {result['seconds']:.0f} s"
              + (f" ({result['error']})" if "error" in result else ""), flush=True)
        # Written after every run, so a stopped benchmark keeps what it finished.
        record = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["python", "benchmarks/bench_losses.py", *sys.argv[1:]]),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "steps": args.steps, "val_batches": args.val_batches, "threads": args.threads or "torch default",
            "results": results,
        }
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(record, indent=1) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
