"""The ``geomon`` command.

Usage::

    geomon demo [DEMO ARGS...]                     # train the tiny CPU GPT and print its geometry (geomon.tools.demo)
    geomon report RUN [--out DIR] [--steps S1,S2]  # HTML + PNG report of a logged run
    geomon inspect MODEL [--seq-len N] [--batch-size B] [--input-shape C,H,W] [--measure] [--json]  # what geomon
                                                   # would watch, what it costs, when its first values arrive

``python -m geomon`` is the same command. Errors a user can fix (a missing path, an unreadable file, a run without
``geomon/...`` values, a MODEL that does not load) print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def parse_steps(text: str) -> list[int]:
    """``"100,2000, 5000"`` -> ``[100, 2000, 5000]`` (for ``--steps``).

    Example:
        >>> parse_steps("100,2000, 5000")
        [100, 2000, 5000]
    """
    try:
        steps = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integer steps, got {text!r}") from None
    if not steps:
        raise argparse.ArgumentTypeError("expected at least one step")
    return steps


def positive_int(text: str) -> int:
    """A positive integer argument (``--seq-len``, ``--batch-size``, ...)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def input_shape(text: str) -> tuple[int, ...]:
    """A sample shape argument (``--input-shape 3,224,224``)."""
    from geomon.tools.inputs import parse_input_shape

    try:
        return parse_input_shape(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (``demo`` is listed here; its arguments go to the demo unparsed)."""
    parser = argparse.ArgumentParser(prog="geomon", description="Training-time geometry monitoring for PyTorch.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands.add_parser(
        "demo", add_help=False, help="train a tiny GPT on CPU and print its geometry (arguments go to the demo)"
    )
    report = commands.add_parser(
        "report",
        help="write an HTML report with figures from a logged run",
        description="Read a run (Lightning CSV logs, TensorBoard event files, an offline W&B run, or the demo's "
        "metrics.csv) and write index.html with embedded figures, plus the PNGs, into --out.",
    )
    report.add_argument("run", metavar="RUN", help="run directory or data file")
    report.add_argument("--out", metavar="DIR", help="output directory (default: RUN/geomon-report)")
    report.add_argument(
        "--steps",
        metavar="S1,S2,...",
        type=parse_steps,
        help="steps for the per-head heatmap (nearest logged; default: first, middle, last)",
    )
    inspect = commands.add_parser(
        "inspect",
        help="list what geomon would monitor on a model with default settings, and what it costs",
        description="Load MODEL and list the attention modules geomon finds (heads per module), the output head and "
        "whether neural collapse would be on, the probes and their logged keys, and the cost per monitored step "
        "(state memory; matmul FLOPs relative to the model's forward). Nothing is downloaded.",
    )
    inspect.add_argument(
        "model",
        metavar="MODEL",
        help="module:factory (e.g. mypkg.models:build), path/to/file.py:factory, a Hugging Face config name in the "
        "local cache, or a directory with a config.json",
    )
    inspect.add_argument("--seq-len", type=positive_int, help="sequence length N (default: the model's, at most 512)")
    inspect.add_argument("--batch-size", type=positive_int, default=8, help="batch size B (default 8)")
    inspect.add_argument("--every-n-steps", type=positive_int, default=50, help="monitoring period (default 50)")
    inspect.add_argument(
        "--measure", action="store_true", help="run one random batch with and without the monitor on the CPU"
    )
    inspect.add_argument("--repeats", type=positive_int, default=3, help="timed forwards with --measure (default 3)")
    inspect.add_argument(
        "--input-shape",
        metavar="C,H,W",
        type=input_shape,
        help="one sample's input shape, no batch dimension (default: read off an image model's attributes)",
    )
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``geomon`` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:
        return _demo(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "inspect":
        return _inspect(args)
    return _report(args.run, args.out, args.steps)


def _demo(argv: list[str]) -> int:
    from geomon.tools import demo

    result = demo.main(argv)
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def _error(message: str) -> int:
    print(f"geomon: error: {message}", file=sys.stderr)
    return 2


def _report(run: str, out: str | None, steps: list[int] | None) -> int:
    try:
        from geomon.tools.report import ReportError, build_report
    except ImportError as error:  # matplotlib is an optional dependency
        return _error(f"geomon report needs {error.name or 'matplotlib'}: pip install 'geomon[report]'")
    try:
        report = build_report(run, out, steps=steps, progress=True)
    except ReportError as error:
        return _error(str(error))
    except ImportError as error:
        return _error(f"geomon report needs {error.name}: pip install 'geomon[report]'")
    span = report.run.step_range()
    steps_text = f", steps {span[0]}..{span[1]}" if span else ""
    print(f"read {report.run.source} run {report.run.path} ({len(report.run.geomon_keys())} geomon series{steps_text})")
    print(f"wrote {report.html}")
    names = ", ".join(path.name for path in report.figures) or "none (no series to draw)"
    print(f"wrote {len(report.figures)} figures to {report.out}: {names}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    import json

    from geomon.tools.inspect_model import InspectError, inspect, jsonable, render

    try:
        report = inspect(
            args.model,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            every_n_steps=args.every_n_steps,
            measure_cost=args.measure,
            repeats=args.repeats,
            input_shape=args.input_shape,
        )
    except InspectError as error:
        return _error(str(error))
    if args.json:
        print(json.dumps(jsonable(report), indent=2, allow_nan=False, default=str))
    else:
        render(report)
    return 0
