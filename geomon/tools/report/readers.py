"""Turn a run directory or file into :class:`~geomon.tools.report.run.RunData`, whichever logger wrote it.

Understood inputs (a directory is searched; it must hold exactly one run):

- a Lightning ``CSVLogger`` version directory: ``metrics.csv`` in wide form (a ``step`` column, one column per key,
  empty cells where a key was not logged); also the long form ``step,key,value``;
- TensorBoard event files ``events.out.tfevents.*`` (scalars; every event file of the directory, in name order);
- a W&B run directory (``wandb/offline-run-*/run-*.wandb``): history rows, the step being ``trainer/global_step``
  (Lightning) or ``train/global_step`` (Hugging Face Trainer)
  when the row has it, else W&B's ``_step``.

Sidecars, read when present beside the run's data, where geomon's callback writes them (the directory of
``metrics.csv`` or of the event files; a W&B run's ``files/`` directory), never from anywhere else:
``geomon_heads.csv`` with columns ``step,key,head,value`` and ``geomon_alerts.csv`` with columns
``step,rule,key,kind,level,text``. A sidecar none of whose keys the run's scalars have is another run's: an error.

Malformed input is an error (:class:`ReportError`, naming the file, and the line where there is one): a row whose
number of cells differs from the header's, a header with an empty or repeated column name, a step that is not an
integer, a value that is not a number, a sidecar given as the run.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from pathlib import Path

from geomon.tools.report.progress import track
from geomon.tools.report.run import Alert, ReportError, RunData

HEADS_FILE, ALERTS_FILE = "geomon_heads.csv", "geomon_alerts.csv"
TB_PREFIX = "events.out.tfevents."


def read_run(path: str | Path, *, progress: bool = False) -> RunData:
    """Read every scalar, head value and alert of the run at ``path`` (a directory or one data file).

    Raises:
        ReportError: the path does not exist, holds no run or several, or a file is unreadable.
    """
    path = Path(path)
    if not path.exists():
        raise ReportError(f"{path} does not exist")
    kind, files = find_data(path)
    data = RunData(path=path, source=kind, files=list(files))
    if kind == "wandb":
        data.scalars = read_wandb(files[0])
    elif kind == "tensorboard":
        data.scalars = read_tensorboard(files, progress=progress)
    else:
        data.source, data.scalars = read_metrics_csv(files[0])
    heads_file, alerts_file = (sidecar(kind, files[0], name) for name in (HEADS_FILE, ALERTS_FILE))
    if heads_file is not None:
        data.heads, data.files = read_heads(heads_file), [*data.files, heads_file]
        _check_own(heads_file, {row[1] for row in data.heads}, data)
    if alerts_file is not None:
        data.sidecar_alerts, data.files = read_alerts(alerts_file), [*data.files, alerts_file]
        _check_own(alerts_file, {value_key(alert.key) for alert in data.sidecar_alerts if alert.key}, data)
    return data


def sidecar(kind: str, data_file: Path, name: str) -> Path | None:
    """The sidecar ``name`` of the run whose data file is ``data_file``: in the same directory (a W&B run: its
    ``files/`` directory, where ``run.dir`` points), or ``None``. Nothing else is searched: a file of that name in a
    parent, sibling or child directory belongs to another run."""
    folder = data_file.parent / "files" if kind == "wandb" else data_file.parent
    found = folder / name
    return found if found.is_file() else None


def value_key(key: str) -> str:
    """The logged key an alert's key is about: a per-head event names ``<key>/head<h>``, which is no scalar key.

    Example:
        >>> value_key("geomon/attention/entropy/blocks.0.attn/head3"), value_key("geomon/rankme/x")
        ('geomon/attention/entropy/blocks.0.attn', 'geomon/rankme/x')
    """
    return re.sub(r"/head\d+$", "", key)


def _check_own(file: Path, keys: set[str], data: RunData) -> None:
    """A sidecar none of whose keys the run logged is another run's (a file copied or left in the wrong place)."""
    logged = set(data.keys())
    if keys and logged and not keys & logged:
        some = ", ".join(sorted(keys)[:3])
        raise ReportError(
            f"{file}: none of its keys ({some}, ...) is among the {len(logged)} keys of the run's "
            f"{data.files[0].name}: it belongs to another run; move it away, or pass that run"
        )


def find_data(path: Path) -> tuple[str, list[Path]]:
    """The kind (``"csv"``, ``"tensorboard"``, ``"wandb"``) and data files of the single run at ``path``.

    In a directory that holds both a ``metrics.csv`` and event files (a CSV and a TensorBoard logger sharing a
    version directory) the CSV is used: it holds the values unrounded.
    """
    if path.is_file():
        name = path.name
        if name in (HEADS_FILE, ALERTS_FILE):
            raise ReportError(f"{path}: this is geomon's {name} sidecar, not a run's metrics; pass the run's directory "
                              "or its metrics.csv / event file / run-*.wandb file")  # fmt: skip
        if name.endswith(".csv"):
            return "csv", [path]
        if name.startswith(TB_PREFIX):
            return "tensorboard", [path]
        if name.endswith(".wandb"):
            return "wandb", [path]
        raise ReportError(f"{path}: not a metrics CSV, TensorBoard event file or W&B run-*.wandb file")
    runs: dict[Path, tuple[str, list[Path]]] = {}
    for folder, _, names in os.walk(path):
        here = Path(folder)
        wandb_files = sorted(here / n for n in names if n.startswith("run-") and n.endswith(".wandb"))
        event_files = sorted(here / n for n in names if n.startswith(TB_PREFIX))
        if wandb_files:
            runs[here] = ("wandb", wandb_files[-1:])
        elif "metrics.csv" in names:
            runs[here] = ("csv", [here / "metrics.csv"])
        elif event_files:
            runs[here] = ("tensorboard", event_files)
    if not runs:
        raise ReportError(f"{path}: no metrics.csv, TensorBoard event file (events.out.tfevents.*) or W&B run file")
    if len(runs) > 1:
        listed = ", ".join(str(folder) for folder in sorted(runs)[:10])
        raise ReportError(f"{path} holds {len(runs)} runs; pass one of them: {listed}")
    return next(iter(runs.values()))


def _table(file: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header and (line number, cells) rows of a CSV file; ReportError if it is not readable CSV text."""
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ReportError(f"{file}: not a CSV file (not UTF-8 text)") from None
    except OSError as error:
        raise ReportError(f"{file}: cannot read it ({error.strerror or error})") from None
    if "\0" in text:
        raise ReportError(f"{file}: not a CSV file (binary content)")
    try:
        lines = list(csv.reader(io.StringIO(text)))
    except csv.Error as error:
        raise ReportError(f"{file}: not a valid CSV file ({error})") from None
    if not lines:
        raise ReportError(f"{file}: empty file, no header")
    header = [cell.strip() for cell in lines[0]]
    if "" in header:
        raise ReportError(f"{file}, line 1: the header has an empty column name (columns: {', '.join(header)})")
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise ReportError(f"{file}, line 1: the header repeats column {', '.join(map(repr, repeated))}")
    rows = [(number, cells) for number, cells in enumerate(lines[1:], start=2) if cells]
    for number, cells in rows:
        if len(cells) != len(header):
            raise ReportError(f"{file}, line {number}: {len(cells)} cells, but the header has {len(header)} columns "
                              "(a truncated or mixed file?)")  # fmt: skip
    return header, rows


def _columns(file: Path, header: list[str], required: tuple[str, ...]) -> dict[str, int]:
    missing = [name for name in required if name not in header]
    if missing:
        raise ReportError(f"{file}: no {', '.join(repr(m) for m in missing)} column (columns: {', '.join(header)})")
    return {name: index for index, name in enumerate(header)}


def _cell(file: Path, line: int, cells: list[str], index: int, column: str) -> str:
    if index >= len(cells):
        raise ReportError(f"{file}, line {line}: no {column!r} value")
    return cells[index].strip()


def _number(file: Path, line: int, text: str, column: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ReportError(f"{file}, line {line}: {column} {text!r} is not a number") from None


def _step(file: Path, line: int, text: str) -> int:
    value = _number(file, line, text, "step")
    if not math.isfinite(value) or value != int(value):
        raise ReportError(f"{file}, line {line}: step {text!r} is not an integer")
    return int(value)


def read_metrics_csv(file: Path) -> tuple[str, list[tuple[int, str, float]]]:
    """Rows of a metrics CSV: ``("csv", ...)`` for Lightning's wide form, ``("csv-long", ...)`` for step,key,value."""
    header, lines = _table(file)
    columns = _columns(file, header, ("step",))
    rows: list[tuple[int, str, float]] = []
    if "key" in columns and "value" in columns:
        for line, cells in lines:
            step = _step(file, line, _cell(file, line, cells, columns["step"], "step"))
            key = _cell(file, line, cells, columns["key"], "key")
            rows.append((step, key, _number(file, line, _cell(file, line, cells, columns["value"], "value"), key)))
        return "csv-long", rows
    keys = [(index, name) for index, name in enumerate(header) if name != "step"]
    for line, cells in lines:
        step_text = _cell(file, line, cells, columns["step"], "step")
        if not step_text:
            continue
        step = _step(file, line, step_text)
        for index, key in keys:
            text = cells[index].strip() if index < len(cells) else ""
            if text:
                rows.append((step, key, _number(file, line, text, key)))
    return "csv", rows


def read_tensorboard(files: list[Path], *, progress: bool = False) -> list[tuple[int, str, float]]:
    """Scalar events of TensorBoard event files (scalar summaries and scalar-valued tensor summaries)."""
    from tensorboard.backend.event_processing import event_accumulator as ea
    from tensorboard.util import tensor_util

    rows: list[tuple[int, str, float]] = []
    for file in track(files, "reading event files", enabled=progress):
        events = ea.EventAccumulator(str(file), size_guidance={ea.SCALARS: 0, ea.TENSORS: 0})
        events.Reload()
        try:
            events.FirstEventTimestamp()  # every event file opens with a version event
        except ValueError:
            if file.stat().st_size:
                raise ReportError(f"{file}: not a TensorBoard event file (no readable event)") from None
        tags = events.Tags()
        for tag in tags["scalars"]:
            rows += [(event.step, tag, float(event.value)) for event in events.Scalars(tag)]
        for tag in tags["tensors"]:
            for event in events.Tensors(tag):
                value = tensor_util.make_ndarray(event.tensor_proto)
                if value.size == 1 and value.dtype.kind in "fiu":
                    rows.append((event.step, tag, float(value.reshape(()))))
    return rows


#: History columns that hold the training step, by logger: Lightning's ``WandbLogger``, the Hugging Face Trainer.
WANDB_STEP_COLUMNS = ("trainer/global_step", "train/global_step")


def wandb_step(row: dict[str, object]) -> int | None:
    """The step of a W&B history row: Lightning's ``trainer/global_step`` or the Hugging Face Trainer's
    ``train/global_step`` if present, else ``_step`` (which counts every ``log`` call, not training steps).

    Example:
        >>> wandb_step({"_step": 3, "trainer/global_step": 40.0}), wandb_step({"_step": 9, "train/global_step": 2})
        (40, 2)
        >>> wandb_step({"_step": 3}), wandb_step({})
        (3, None)
    """
    for name in (*WANDB_STEP_COLUMNS, "_step"):
        value = row.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return int(value)
    return None


def read_wandb(file: Path) -> list[tuple[int, str, float]]:
    """Scalar history values of a W&B run file: numbers logged as values of their own (not the width, size or
    count fields of an image, table, histogram or other media; W&B's own ``_``-prefixed columns left out)."""
    try:
        from geomon.tools.report.wandb_log import history

        rows = history(file, scalars_only=True)
    except ImportError:
        raise ReportError(f"{file}: reading a W&B run needs the wandb package (pip install wandb)") from None
    except Exception as error:  # not a transaction log, or a record protobuf cannot parse
        raise ReportError(f"{file}: not a readable W&B run file ({error})") from None
    scalars = []
    for row in rows:
        step = wandb_step(row)
        if step is None:
            continue
        scalars += [(step, key, float(value)) for key, value in row.items() if not key.startswith("_")]  # type: ignore[arg-type]
    return scalars


def read_heads(file: Path) -> list[tuple[int, str, int, float]]:
    """Rows ``(step, key, head, value)`` of a ``geomon_heads.csv`` sidecar."""
    header, lines = _table(file)
    c = _columns(file, header, ("step", "key", "head", "value"))
    rows = []
    for line, cells in lines:
        step = _step(file, line, _cell(file, line, cells, c["step"], "step"))
        key = _cell(file, line, cells, c["key"], "key")
        head = _number(file, line, _cell(file, line, cells, c["head"], "head"), "head")
        if head != int(head) or head < 0:
            raise ReportError(f"{file}, line {line}: head {head!r} is not a head index")
        rows.append((step, key, int(head), _number(file, line, _cell(file, line, cells, c["value"], "value"), key)))
    return rows


def read_alerts(file: Path) -> list[Alert]:
    """Rows of a ``geomon_alerts.csv`` sidecar (``step`` and ``rule`` required; other columns may be absent)."""
    header, lines = _table(file)
    c = _columns(file, header, ("step", "rule"))
    alerts = []
    for line, cells in lines:
        text = {name: cells[c[name]].strip() if name in c and c[name] < len(cells) else "" for name in Alert.COLUMNS}
        alerts.append(Alert(_step(file, line, text.pop("step")), **text))
    return alerts
