"""What a multirun's jobs logged, read back for analysis (`notebooks/sweep_analysis.ipynb`).

A job logs through `logger=csv` (`<job>/csv/version_<n>/metrics.csv`) or `logger=wandb`; an offline wandb
run keeps its metrics only in its transaction log (`<job>/wandb/offline-run-*/run-<id>.wandb`, no summary
file until it is synced), which is read here directly.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from pathlib import Path

# wandb's transaction log: a 7-byte header, then 32 KiB blocks of [crc32, length, type] chunks, where a
# record is one FULL chunk or FIRST, MIDDLE..., LAST
WANDB_BLOCK = 32768
WANDB_HEADER = 7
WANDB_RECORD_ENDS = (1, 4)


def wandb_records(path: Path) -> Iterator:
    """The protobuf records of an offline run's `run-<id>.wandb` file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a wandb transaction log (it does not start with ':W&B').")
    pos, chunks = WANDB_HEADER, b""
    while pos + 7 <= len(data):
        left = WANDB_BLOCK - pos % WANDB_BLOCK
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length, kind) == (0, 0):  # padding at the end of a block
            pos += left
            continue
        if pos + 7 + length > len(data):  # the writer is mid-record
            return
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in WANDB_RECORD_ENDS:
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record


def _number(value_json: str) -> float | None:
    value = json.loads(value_json)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def wandb_last_metrics(run_file: Path) -> dict[str, float]:
    """The last logged value of every numeric metric of one offline wandb run (its summary wins)."""
    metrics: dict[str, float] = {}
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        items = (
            record.history.item if kind == "history" else record.summary.update if kind == "summary" else ()
        )
        for item in items:
            value = _number(item.value_json)
            if value is not None:
                metrics[item.key or "/".join(item.nested_key)] = value
    return metrics


def job_metrics(job: Path) -> dict[str, float]:
    """The last value of every metric a multirun job logged: from its CSV log, else its wandb run(s)."""
    job = Path(job)
    csvs = sorted(job.glob("**/metrics.csv"))
    if csvs:
        import pandas as pd

        table = pd.concat([pd.read_csv(path) for path in csvs])
        return {c: float(table[c].dropna().iloc[-1]) for c in table.columns if table[c].notna().any()}
    runs = sorted(job.glob("**/wandb/*run-*/run-*.wandb"))
    if runs:
        metrics: dict[str, float] = {}
        for run in runs:  # a resumed job may hold several; the newest comes last
            metrics |= wandb_last_metrics(run)
        return metrics
    raise FileNotFoundError(
        f"{job}: no metrics.csv (logger=csv) and no wandb run file (logger=wandb, wandb/*run-*/run-*.wandb) "
        "under this job folder; point the notebook at the multirun folder whose job folders hold them."
    )
