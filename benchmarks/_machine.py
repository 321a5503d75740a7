"""What the benchmark scripts record about the machine they ran on."""

from __future__ import annotations

import datetime
import platform
import tempfile
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages, or ``n/a``: other work on the machine skews absolute times."""
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


def write_results(lines: list[str], kind: str, *, out: Path | None, quick: bool, gpu: str | None) -> Path:
    """Write a results file: ``out`` if given, a temporary file for ``--quick`` smoke runs, else
    ``benchmarks/results/<device>-<kind>-<date>.md`` (device: the GPU's name, or ``cpu``)."""
    date = datetime.date.today().isoformat()
    if out is None and quick:
        out = Path(tempfile.gettempdir()) / f"{kind}-{date}-quick.md"
    elif out is None:
        slug = (gpu or "cpu").replace(" ", "-").replace("/", "-")
        out = Path(__file__).resolve().parent / "results" / f"{slug}-{kind}-{date}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    return out
