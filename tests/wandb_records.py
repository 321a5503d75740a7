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
