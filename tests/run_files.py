"""Reading what a run wrote: metrics.jsonl, TensorBoard events and W&B's offline run files."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from nemo_dpo.utils.metrics_file import RECORD_KEYS


def jsonl_metrics(log_dir: Path) -> dict[int, dict[str, float]]:
    """``step -> {name: value}`` of ``metrics.jsonl`` (train and validation records of a step merged)."""
    steps: dict[int, dict[str, float]] = {}
    for line in (log_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        steps.setdefault(record["step"], {}).update(
            {k: float(v) for k, v in record.items() if k not in RECORD_KEYS})
    return steps


def tensorboard_metrics(log_dir: Path) -> dict[int, dict[str, float]]:
    """``step -> {tag: value}`` of the TensorBoard scalars in ``log_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    steps: dict[int, dict[str, float]] = {}
    for tag in events.Tags()["scalars"]:
        for event in events.Scalars(tag):
            steps.setdefault(event.step, {})[tag] = event.value
    return steps


def _wandb_records(run_file: Path) -> list[bytes]:
    """The records of a ``.wandb`` file: a 7-byte header (":W&B", magic, version), then LevelDB-log
    style 32 KiB blocks of chunks, each with a 7-byte header (crc32, length, type: 1 full, 2 first,
    3 middle, 4 last)."""
    data = run_file.read_bytes()
    assert data[:4] == b":W&B", f"{run_file} is not a W&B run file"
    block = 32 * 1024
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:  # a block's tail too short for a header is padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding to the end of the block
            pos += room
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(pending)
            pending = b""
    return records


def wandb_offline_metrics(wandb_dir: Path) -> dict[int, dict[str, float]]:
    """``step -> {name: value}`` that the one offline run under ``wandb_dir`` (``<dir>/wandb``) logged
    (W&B's own ``_step``, ``_runtime``, ``_timestamp`` left out)."""
    from wandb.proto import wandb_internal_pb2

    (run_file,) = wandb_dir.glob("offline-run-*/run-*.wandb")
    steps: dict[int, dict[str, float]] = {}
    for data in _wandb_records(run_file):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") != "history":
            continue
        items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
        step = int(items.pop("_step"))
        steps.setdefault(step, {}).update({k: float(v) for k, v in items.items() if not k.startswith("_")})
    return steps
