"""Read back what an offline W&B run logged: its ``run-*.wandb`` file is a LevelDB-log-framed stream of
``wandb_internal_pb2.Record`` messages (a 7-byte file header, 32 KiB blocks, 7-byte record headers)."""

from __future__ import annotations

import json
from pathlib import Path

from geomon.tools.report.wandb_log import iter_payloads as _payloads


def history(run_file: Path) -> list[dict[str, object]]:
    """Every history row of the run, values decoded from JSON."""
    from wandb.proto import wandb_internal_pb2

    rows = []
    for payload in _payloads(Path(run_file).read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            )
    return rows


def alerts(run_file: Path) -> list[dict[str, object]]:
    """Every ``run.alert(...)`` of the run: its title, text, level and wait duration (milliseconds)."""
    from wandb.proto import wandb_internal_pb2

    found = []
    for payload in _payloads(Path(run_file).read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "alert":
            alert = record.alert
            found.append(
                {"title": alert.title, "text": alert.text, "level": alert.level, "wait_duration": alert.wait_duration}
            )
    return found


def _records(run_file: Path, kind: str) -> list[object]:
    from wandb.proto import wandb_internal_pb2

    found = []
    for payload in _payloads(Path(run_file).read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == kind:
            found.append(getattr(record, kind))
    return found


def _items(items) -> dict[str, object]:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def summary(run_file: Path) -> dict[str, object]:
    """The run's summary as W&B last wrote it: every ``summary`` record's updates applied in order."""
    merged: dict[str, object] = {}
    for record in _records(run_file, "summary"):
        merged.update(_items(record.update))
        for item in record.remove:
            merged.pop(item.key or "/".join(item.nested_key), None)
    return merged


def config(run_file: Path) -> dict[str, object]:
    """The run's config: every ``config`` record's updates applied in order (W&B wraps values as ``{"value": x}``
    in some versions; this returns them unwrapped)."""
    merged: dict[str, object] = {}
    for record in _records(run_file, "config"):
        merged.update(_items(record.update))
    return {k: v["value"] if isinstance(v, dict) and set(v) == {"value"} else v for k, v in merged.items()}


def metrics(run_file: Path) -> dict[str, object]:
    """Every ``define_metric`` record of the run by its name (or glob)."""
    return {m.name or m.glob_name: m for m in _records(run_file, "metric")}
