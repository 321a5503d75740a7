"""Replay alert rules over the recorded scenarios and print the benchmark's table (and write it as markdown).

``python benchmarks/alerts/replay.py [--records DIR] [--out FILE]``: for each unstable run the first WARN and first
ERROR step, the loss-spike step (``scenarios.loss_spike``) and the lead time; for each healthy run every WARN or
ERROR raised; over the learning-rate sweep, "alerted" vs "final loss degraded by more than 10% vs the best rate"
as precision and recall. The rules are geomon's defaults unless ``rules_factory`` is given (tuning experiments).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from scenarios import by_name, loss_spike

from geomon.alerts import AlertEngine, EntropyCollapse, MaxLogitAbove, NonFinite, RankCollapse, Rule, default_rules

RECORDS = Path(__file__).resolve().parents[1] / "results" / "alerts" / "records"
DEGRADED = 1.10  # final loss above 1.1 x the sweep's best: degraded


def previous_defaults() -> list[Rule]:
    """The defaults before this benchmark (one collapsed head in ten model-wide was a WARN, relative test on),
    replayed with today's engine."""
    return [EntropyCollapse(relative_drop=0.5, share_levels=(0.1, 0.5), layer_share=1.0), MaxLogitAbove(),
            RankCollapse(), NonFinite()]  # fmt: skip


RULES = {"default": default_rules, "previous": previous_defaults}


def events_of(record: dict, rules: list[Rule]) -> list:
    engine = AlertEngine(rules)
    events = []
    for point in record["measured"]:
        events += engine.evaluate(point["step"], point["values"], point["heads"])
    return [e for e in events if e.kind == "fired"]


def first(events: list, level: str) -> int | None:
    steps = [e.step for e in events if e.level == level or (level == "WARN" and e.level == "ERROR")]
    return min(steps) if steps else None


def summarise(records: dict[str, dict], rules_factory: Callable[[], list[Rule]] = default_rules) -> dict:
    rows = {}
    for name, record in sorted(records.items()):
        events = events_of(record, rules_factory())
        rows[name] = {
            "kind": _kind(name, record),
            "lr": record["scenario"]["lr"],
            "steps": len(record["losses"]),
            "spike": loss_spike(record["losses"]),
            "final_loss": record["final_loss"],
            "warn": first(events, "WARN"),
            "error": first(events, "ERROR"),
            "alerts": [
                f"{e.level} {e.rule} @{e.step} {e.key.rsplit('/', 1)[-1]}"
                for e in events
                if e.level in ("WARN", "ERROR")
            ],
            "info": sum(e.level == "INFO" for e in events),
        }
    sweep = {n: r for n, r in rows.items() if r["kind"] == "sweep"}
    if sweep:
        best = min(r["final_loss"] for r in sweep.values() if math.isfinite(r["final_loss"]))
        for r in sweep.values():
            r["degraded"] = not math.isfinite(r["final_loss"]) or r["final_loss"] > DEGRADED * best
    return rows


def _kind(name: str, record: dict) -> str:
    """The scenario's kind as defined now (a record keeps the one it was recorded with)."""
    try:
        return by_name(name).kind
    except KeyError:
        return record["scenario"]["kind"]


def scores(rows: dict) -> dict:
    """Lead times, healthy false alarms and sweep precision / recall (the issue's acceptance criteria)."""
    unstable = {n: r for n, r in rows.items() if r["kind"] == "unstable"}
    healthy = {n: r for n, r in rows.items() if r["kind"] == "healthy"}
    sweep = {n: r for n, r in rows.items() if r["kind"] == "sweep"}
    leads = {
        n: (None if r["warn"] is None or r["spike"] is None else r["spike"] - r["warn"]) for n, r in unstable.items()
    }
    alerted = {n for n, r in sweep.items() if r["warn"] is not None}
    degraded = {n for n, r in sweep.items() if r["degraded"]}
    best_lr = min((r["final_loss"], r["lr"]) for r in sweep.values())[1] if sweep else 0.0
    unstable_side = {n for n in degraded if sweep[n]["lr"] > best_lr}  # too high a rate: what alerts are for

    def precision_recall(truth: set[str]) -> tuple[float, float]:
        hits = len(alerted & truth)
        precision = hits / len(alerted) if alerted else (1.0 if not truth else 0.0)
        return precision, hits / len(truth) if truth else 1.0

    return {
        "leads": leads,
        "healthy_alarms": {n: r["alerts"] for n, r in healthy.items()},
        "sweep_all": precision_recall(degraded),  # every degraded rate, too low ones (under-trained) included
        "sweep_above_best": precision_recall(unstable_side),  # degraded rates above the best one
    }


def table(rows: dict) -> str:
    header = ["scenario", "kind", "lr", "steps", "final loss", "loss spike", "first WARN", "first ERROR", "lead",
              "WARN/ERROR raised"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, r in rows.items():
        lead = "" if r["warn"] is None or r["spike"] is None else str(r["spike"] - r["warn"])
        kind = r["kind"] + (" (degraded)" if r.get("degraded") else "")
        raised = "; ".join(r["alerts"][:4]) + (f" (+{len(r['alerts']) - 4})" if len(r["alerts"]) > 4 else "")
        lines.append(f"| {name} | {kind} | {r['lr']:g} | {r['steps']} | {r['final_loss']:.3f} | {r['spike']} | "
                     f"{r['warn']} | {r['error']} | {lead} | {raised or '-'} |")  # fmt: skip
    return "\n".join(lines)


def load(directory: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=Path, default=RECORDS)
    parser.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    parser.add_argument("--rules", choices=sorted(RULES), default="default", help="geomon's defaults or the previous")
    args = parser.parse_args(argv)
    rows = summarise(load(args.records), RULES[args.rules])
    text = table(rows)
    result = scores(rows)
    (p_all, r_all), (p_high, r_high) = result["sweep_all"], result["sweep_above_best"]
    summary = "\n".join([
        "",
        f"leads (spike - first WARN): {result['leads']}",
        f"healthy WARN/ERROR: {result['healthy_alarms']}",
        f"sweep, 'final loss > {DEGRADED} x best' over every rate: precision {p_all:.2f} recall {r_all:.2f}",
        f"sweep, the same over the rates above the best one: precision {p_high:.2f} recall {r_high:.2f}",
    ])  # fmt: skip
    print(text + summary)
    if args.out:
        args.out.write_text(text + "\n" + summary + "\n")


if __name__ == "__main__":
    main()
