"""Read an offline (or synced) W&B run file, ``run-*.wandb``, without the W&B service.

The file is a LevelDB-log-framed stream of ``wandb_internal_pb2.Record`` protobuf messages: a 7-byte file header
(``b":W&B"``, magic ``0xBEE1``, version), then 32 KiB blocks of records, each with a 7-byte header (crc32, length,
type) and a payload; a payload that does not fit in a block is split into FIRST / MIDDLE / LAST pieces. Only the
framing lives here; the messages are decoded with the protobuf classes that ship with ``wandb``.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

BLOCK = 32768
HEADER = 7  # crc32 (4), length (2), type (1); the file header is also 7 bytes: b":W&B", magic 0xBEE1, version
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4
MAGIC = b":W&B"


def iter_payloads(data: bytes) -> Iterator[bytes]:
    """The record payloads of a W&B transaction log, reassembled across blocks.

    A record cut short at the end of the data (a run still being written) is dropped.

    Args:
        data: the whole file's bytes.

    Raises:
        ValueError: the data does not start with the W&B header.

    Example:
        >>> payload = b"hello"
        >>> record = struct.pack("<IHB", 0, len(payload), FULL) + payload
        >>> list(iter_payloads(MAGIC + b"\\xe1\\xbe\\x00" + record))
        [b'hello']
    """
    if data[:4] != MAGIC:
        raise ValueError("not a W&B transaction log (no ':W&B' header)")
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0:  # zero padding up to the end of the block
            pos += left
            continue
        if pos + HEADER + length > len(data):  # truncated last record
            return
        payload = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == FULL:
            yield payload
        elif kind == FIRST:
            pending = payload
        elif kind == MIDDLE:
            pending += payload
        elif kind == LAST:
            yield pending + payload


def records(run_file: str | Path) -> Iterator[object]:
    """Every ``wandb_internal_pb2.Record`` of the run file, in order (needs the ``wandb`` package)."""
    from wandb.proto import wandb_internal_pb2

    for payload in iter_payloads(Path(run_file).read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        yield record


def history(run_file: str | Path, *, scalars_only: bool = False) -> list[dict[str, object]]:
    """Every history row of the run (one per ``run.log`` commit), values decoded from JSON.

    Nested keys are joined with ``/``; W&B's own columns (``_step``, ``_runtime``, ``_timestamp``) are kept. With
    ``scalars_only``, only numbers that are values of their own are kept: W&B writes a logged object (an image, a
    table, a histogram, any media) as a group of entries under its key, one of them ``_type``, and every entry of
    such a group is left out (see :func:`scalar_items`).
    """
    rows = []
    for record in records(run_file):
        if record.WhichOneof("record_type") == "history":
            items = [(tuple(item.nested_key) or (item.key,), json.loads(item.value_json))
                     for item in record.history.item]  # fmt: skip
            if scalars_only:
                items = scalar_items(items)
            rows.append({"/".join(path): value for path, value in items})
    return rows


def scalar_items(items: list[tuple[tuple[str, ...], object]]) -> list[tuple[tuple[str, ...], object]]:
    """The entries of one history row that are scalar series: numbers (not booleans) that are not part of a logged
    object, i.e. no prefix of their key path holds a ``_type`` entry (W&B's mark of media: images, tables,
    histograms, ...) and the value is no such object itself.

    Example:
        >>> row = [(("loss",), 0.5), (("heatmap", "_type"), "image-file"), (("heatmap", "width"), 300),
        ...        (("nested", "x"), 2), (("done",), True), (("table",), {"_type": "table-file", "nrows": 3})]
        >>> [path for path, _ in scalar_items(row)]
        [('loss',), ('nested', 'x')]
    """
    objects = {path[:-1] for path, _ in items if path and path[-1] == "_type"}
    kept = []
    for path, value in items:
        if any(path[:end] in objects for end in range(1, len(path) + 1)):
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            kept.append((path, value))
    return kept
