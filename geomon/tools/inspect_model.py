"""``geomon inspect MODEL``: what a default monitor watches on a model, and what that costs.

MODEL is a factory (``module:factory``, ``file.py:factory``) or a Hugging Face config (:mod:`geomon.tools.load`).

Nothing is decided here: what is listed is the plan :meth:`geomon.Monitor.attach` builds
(:func:`geomon.probes.plan.build_plan`, from a default monitor's options; it allocates nothing, so a ``meta`` model
will do): its probes, their keys and state sizes, the output head and whether a
:class:`~geomon.probes.CollapseProbe` is in it. This module assembles the report and renders it.

What that costs, estimated and measured: :mod:`geomon.tools.cost`.
"""

from __future__ import annotations

import math
import sys
import warnings
from dataclasses import replace
from typing import Any

from torch import nn

from geomon import keys
from geomon.capture.attention import find_attention_modules
from geomon.capture.modules import compiled_parts, head_dims
from geomon.monitor import Monitor
from geomon.probes import AttentionProbe, CollapseProbe, LogitMapProbe
from geomon.probes.logit_map import qk_weights
from geomon.probes.plan import AUTO_COLLAPSE_MAX_ELEMENTS, MIB, Plan, build_plan, plain_modules, plain_name
from geomon.tools.cost import estimate_flops, measure
from geomon.tools.inputs import image_shape, image_tokens, require_image
from geomon.tools.load import InspectError, load_model, one_line, safe_call

__all__ = ["InspectError", "describe", "estimate_flops", "inspect", "jsonable", "measure", "render"]

#: Default sequence length when the model does not say how long its context is (and the cap when it does).
DEFAULT_SEQ_LEN = 512
#: Default batch size of the cost estimate.
DEFAULT_BATCH_SIZE = 8

NO_HEAD = (
    "no output head found: the model has no get_output_embeddings() and no linear layer named like a head (lm_head, "
    "head, classifier, fc, ...); pass head=<module name> to watch one"
)
COMPILED = (
    "the model is compiled with torch.compile: its compiled forward runs no hooks, so the hook-based probes "
    "(attention, head input) are fed by an extra eager forward (Monitor.measure_forward, GeomonCallback("
    "measure_forward=...)), or hand tensors to Monitor.observe"
)
NO_ATTENTION = (
    "no module recognisably attention; modules that call F.scaled_dot_product_attention, or that write softmax "
    "attention by hand, are still seen at run time (--measure lists what a forward reports)"
)


# -- what is watched: the plan -----------------------------------------------------------------------------------------


def attention_shape(module: nn.Module, heads: int | None) -> tuple[int | None, int | None]:
    """``(key heads, head width)`` of an attention module with ``heads`` query heads, from its Q/K weights or its
    attributes (None where unknown), for the cost model.

    Example:
        >>> attention_shape(nn.MultiheadAttention(16, 4), 4)
        (4, 4)
    """
    found = qk_weights(module, gather=False)
    if found is not None:
        return int(found[1].shape[0]), int(found[0].shape[1])
    config = getattr(module, "config", None)
    head_dim = getattr(module, "head_dim", None) or getattr(module, "attention_head_size", None)
    if head_dim is None and heads and isinstance(getattr(config, "hidden_size", None), int):
        head_dim = config.hidden_size // heads
    kv = getattr(module, "num_key_value_heads", None) or getattr(config, "num_key_value_heads", None) or heads
    return tuple(v if isinstance(v, int) and v > 0 else None for v in (kv, head_dim))  # type: ignore[return-value]


def max_positions(model: nn.Module, config: Any = None) -> int | None:
    """The longest sequence the model takes, when it says (a Hugging Face config, or a ``context`` /
    ``block_size`` / ``max_seq_len`` attribute)."""
    config = config if config is not None else getattr(model, "config", None)
    found = [getattr(config, name, None) for name in ("n_positions", "max_position_embeddings")]
    found += [getattr(model, name, None) for name in ("context", "block_size", "max_seq_len")]
    return next((value for value in found if isinstance(value, int) and value > 0), None)


def describe(model: nn.Module, *, every_n_steps: int = 50) -> tuple[Plan, dict[str, Any]]:
    """The plan a default :class:`geomon.Monitor` builds at attach for ``model``, and what it lists (no forward, no
    state allocated).

    Example:
        >>> from geomon._tiny_gpt import TinyGPT
        >>> plan, found = describe(TinyGPT(vocab_size=20, d_model=32, n_layer=1, n_head=2, context=8))
        >>> [a["module"] for a in found["attention"]], found["head"]["module"], found["neural_collapse"]["enabled"]
        (['blocks.0.attn'], 'head', True)
    """
    monitor = Monitor(every_n_steps=every_n_steps)
    notes = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:  # the budget is checked below, so that a plan over it is still listed
            plan = build_plan(model, replace(monitor.options, memory_budget_mib=math.inf))
        except ValueError as error:
            raise InspectError(f"a default Monitor.attach fails on this model: {one_line(error)}") from error
    notes += [f"warning: {w.message}" for w in caught if "neural collapse is off" not in str(w.message)]
    plan.options, budget = monitor.options, monitor.options.memory_budget_mib
    try:
        plan.check_budget()
    except ValueError as error:
        notes.append(f"Monitor.attach would refuse this plan: {error}")
    modules = plain_modules(model)
    kinds = {plain_name(name): kind for name, kind in find_attention_modules(model).items()}
    attention = []
    for probe in plan.of_kind(AttentionProbe.kind):
        heads = None if probe.spec is None else probe.spec[0]
        kv_heads, head_dim = attention_shape(modules[probe.name], heads)
        attention.append({"module": probe.name, "kind": kinds.get(probe.name, "?"), "heads": heads,
                          "kv_heads": kv_heads, "head_dim": head_dim, "keys": probe.keys()})  # fmt: skip
    logit_maps = []
    for probe in plan.of_kind(LogitMapProbe.kind):
        w_q = qk_weights(modules[probe.name], gather=False)[0]  # type: ignore[index]
        logit_maps.append(dict(zip(("module", "heads", "head_dim", "width"), (probe.name, *w_q.shape), strict=True)))

    head: dict[str, Any] = {"module": plan.head, "num_classes": None, "num_features": None, "reason": NO_HEAD}
    collapse = plan.of_kind(CollapseProbe.kind)
    nc = {"enabled": bool(collapse), "reason": "no output head", "state_elements": None,
          "limit": AUTO_COLLAPSE_MAX_ELEMENTS}  # fmt: skip
    if plan.head is not None:
        c, d = head_dims(modules[plan.head])
        head.update(num_classes=c, num_features=d, reason=_head_reason(model, modules[plan.head]))
        size = _mib((collapse[0] if collapse else CollapseProbe(plan.head, c, d)).state_bytes())  # not allocated
        cap = AUTO_COLLAPSE_MAX_ELEMENTS
        limit = f"C x D = {c} x {d} = {c * d:,} {'<=' if c * d <= cap else '>'} {cap:,} (AUTO_COLLAPSE_MAX_ELEMENTS)"
        nc.update(state_elements=c * d, reason=f"{limit}; float64 state {size}, fed on steps whose batch has labels"
                  if collapse else f"{limit}; its float64 state would take {size}: pass neural_collapse=True to "
                  "watch it anyway")  # fmt: skip
    probes = [{"probe": p.pid, "kind": p.kind, "target": p.name, "keys": p.keys(), "state_bytes": p.state_bytes()}
              for p in plan]  # fmt: skip
    alerts = [keys.key(keys.ALERTS, rule.name) for rule in monitor.alert_engine.rules]
    probes.append({"probe": "alerts", "kind": "alerts", "target": "default rules", "keys": alerts, "state_bytes": 0})
    by_kind: dict[str, int] = {}
    for p in plan:
        by_kind[p.kind] = by_kind.get(p.kind, 0) + p.state_bytes()
    notes += [COMPILED] if compiled_parts(model) else []
    notes += [] if attention else [NO_ATTENTION]
    return plan, {
        "attention": attention,
        "logit_maps": logit_maps,
        "head": head,
        "neural_collapse": nc,
        "probes": probes,
        "keys": sorted(plan.keys() + alerts),
        "state_bytes": {"by_kind": by_kind, "total": plan.state_bytes(), "budget": round(budget * MIB)},
        "every_n_steps": every_n_steps,
        "notes": notes,
    }


def _head_reason(model: nn.Module, head: nn.Module) -> str:
    for module in model.modules():  # as find_head asks: any submodule's get_output_embeddings()
        getter = getattr(module, "get_output_embeddings", None)
        if callable(getter) and safe_call(getter) is head:
            return "the model's get_output_embeddings()"
    return "the last linear layer named like a head"


def _mib(n_bytes: float) -> str:
    if not n_bytes:
        return "none"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.{2 if unit == 'GiB' else 1}f} {unit}"
    return f"{n_bytes / 1024:.1f} KiB"


# -- the report --------------------------------------------------------------------------------------------------------


def inspect(spec: str, *, seq_len: int | None = None, batch_size: int = DEFAULT_BATCH_SIZE, every_n_steps: int = 50,
            measure_cost: bool = False, repeats: int = 3, input_shape: tuple[int, ...] | None = None,
            ) -> dict[str, Any]:  # fmt: skip
    """Everything ``geomon inspect`` prints, as one JSON-able dict (see the module docstring)."""
    loaded = load_model(spec, materialise=measure_cost)
    model = loaded.model
    plan, found = describe(model, every_n_steps=every_n_steps)
    notes = found.pop("notes")
    require_image(model, input_shape)
    image = image_shape(model)
    if image is not None and input_shape is None:
        input_shape = image[0]
        if not image[1]:
            notes.append(f"the model does not say its image size: {'x'.join(map(str, input_shape))} assumed "
                         "(pass --input-shape C,H,W)")  # fmt: skip
    tokens = None if image is None else image_tokens(model, input_shape)  # type: ignore[arg-type]
    limit = max_positions(model, loaded.config)
    if seq_len is None:
        seq_len = tokens or (min(DEFAULT_SEQ_LEN, limit) if limit else DEFAULT_SEQ_LEN)
    elif limit is not None and seq_len > limit:
        notes.append(f"--seq-len {seq_len} is longer than the model's {limit} positions; using {limit}")
        seq_len = limit
    measured = None
    if measure_cost:
        measured = measure(model, plan, batch_size=batch_size, seq_len=seq_len, repeats=repeats,
                           input_shape=input_shape if image is not None or input_shape else None)  # fmt: skip
        planned, seen = {info["module"] for info in found["attention"]}, set(measured["seen_attention"])
        if seen - planned:
            notes.append(f"attention seen at run time in modules not in the plan: {', '.join(sorted(seen - planned))}")
        if planned - seen:
            notes.append(f"planned attention modules that reported nothing: {', '.join(sorted(planned - seen))}")
        notes += [f"warning during the measured forward: {warning}" for warning in measured["warnings"]
                  if "neural collapse is off" not in warning]  # already said, with the reason  # fmt: skip
    rows = measured["rows_per_step"] if measured else None
    if rows is None and plan.head is not None:
        if image is not None:  # a classifier: one row per image enters the head
            rows = batch_size
            notes.append("rows per step assumed B, one per image (an image classifier's head); --measure reads the "
                         "real number")  # fmt: skip
        else:
            notes.append("rows per step assumed B·N (a token-level head); --measure reads the real number")
    cost = estimate_flops(plan, found, model, batch_size=batch_size, seq_len=seq_len, rows=rows,
                          every_n_steps=every_n_steps)  # fmt: skip
    if cost["attention_not_estimated"]:
        notes.append(
            f"attention FLOPs of {', '.join(cost['attention_not_estimated'])} not estimated: head count unknown"
        )
    return {
        "model": spec,
        "source": loaded.source,
        "description": loaded.description,
        "input_shape": None if input_shape is None else list(input_shape),
        "class": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        **found,
        "cost": cost,
        "measured": measured,
        "notes": notes,
    }


def jsonable(value: Any) -> Any:
    """``value`` with every non-finite float as ``None``, so that the JSON is strict (no ``NaN`` tokens).

    Example:
        >>> jsonable({"a": [1.0, float("nan")], "b": float("inf")})
        {'a': [1.0, None], 'b': None}
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    return value


def _flops(value: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {unit}FLOP"
    return f"{value:.0f} FLOP"


def _compress_keys(names: list[str]) -> str:
    """``geomon/a/x/m, geomon/b/x/m`` -> ``geomon/{a,b}/x/m`` style grouping by everything but the stat."""
    parts = [name.split("/") for name in names]
    if len(names) > 3 and all(len(p) == len(parts[0]) for p in parts):
        varying = [i for i in range(len(parts[0])) if len({p[i] for p in parts}) > 1]
        if len(varying) == 1:
            i = varying[0]
            middle = "{" + ",".join(dict.fromkeys(p[i] for p in parts)) + "}"
            return "/".join([*parts[0][:i], middle, *parts[0][i + 1 :]])
    return "\n".join(names)


def sections(report: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """The report as titled tables of strings (shared by the rich and the plain rendering)."""
    measured = report["measured"]
    seen = measured["seen_attention"] if measured else None
    logit = {item["module"] for item in report["logit_maps"]}
    rows = []
    for info in report["attention"]:
        heads = "?" if info["heads"] is None else str(info["heads"])
        if seen is not None:
            heads += f" (seen {seen[info['module']]})" if info["module"] in seen else " (not seen)"
        rows.append([info["module"] or "(the model)", info["kind"], heads, str(info["kv_heads"] or "?"),
                     str(info["head_dim"] or "?"), "yes" if info["module"] in logit else "no"])  # fmt: skip
    header = ["module", "kind", "heads", "kv heads", "head dim", "logit σ logged"]
    out = [(f"attention modules ({len(rows)})", header, rows or [["(none found)", "", "", "", "", ""]])]

    head, nc = report["head"], report["neural_collapse"]
    found = f"{head['module']} ({head['num_classes']} x {head['num_features']}), found as {head['reason']}"
    head_rows = (
        [["output head", "none"], ["why", head["reason"]]] if head["module"] is None else [["output head", found]]
    )
    head_rows.append(["neural collapse", ("on: " if nc["enabled"] else "off: ") + nc["reason"]])
    out.append(("output head", ["", ""], head_rows))

    probe_rows = [[p["kind"], p["target"], _compress_keys(p["keys"]), _mib(p["state_bytes"])] for p in report["probes"]]
    out.append((f"probes and logged keys ({len(report['keys'])} keys)", ["probe", "on", "keys", "state"], probe_rows))

    cost, state = report["cost"], report["state_bytes"]
    cost_rows = [[f"state: {kind} probes", _mib(size)] for kind, size in state["by_kind"].items() if size]
    cost_rows += [
        ["state: total (float64, kept for the run)", f"{_mib(state['total'])} of {_mib(state['budget'])} budget"],
        [f"model forward (B={cost['batch_size']}, N={cost['seq_len']})", _flops(cost["model_forward"])],
        ["capture during the forward", _flops(cost["capture"])],
        ["logit maps, every compute", _flops(cost["compute_matmul"] + cost["compute_qr"])],
        ["extra per monitored step / forward", f"{cost['ratio']:.1%}"],
        [
            f"amortised over every_n_steps={report['every_n_steps']}, {cost['fill_steps']} fill step(s) included",
            f"{cost['amortised_ratio']:.2%}",
        ],
    ]
    if cost["window_rows"] is not None:
        window = f"{cost['window_rows']} rows = {cost['steps_per_window']} step(s) of {cost['rows_per_step']}"
        solvers = _flops(cost["window_matmul"] + cost["window_solvers"])
        first, every = cost["first_value_step"], report["every_n_steps"]
        first_text = f"step {first} ({first // every} logging interval(s) of {every} steps)"
        cost_rows += [["window (rows per step)", window], ["first RankMe / neural collapse value", first_text],
                      ["per closed window (solvers + NC)", solvers]]  # fmt: skip
    if measured:
        capture = f"{measured['monitored_forward_s'] * 1e3:.1f} ms, capture {_flops(measured['capture_flops'])}"
        ratio = f"time {measured['time_overhead']:+.1%}, matmul FLOPs {measured['flop_overhead']:+.1%}"
        cost_rows += [
            [f"measured: input {measured['input']}, median of {measured['repeats']}", ""],
            ["measured: forward", f"{measured['forward_s'] * 1e3:.1f} ms, {_flops(measured['forward_flops'])}"],
            ["measured: monitored forward", capture],
            ["measured: compute", f"{measured['compute_s'] * 1e3:.1f} ms, {_flops(measured['compute_flops'])}"],
            ["measured: extra per monitored step / forward", ratio],
        ]
    out.append(("cost per monitored step", ["", ""], cost_rows))
    return out


def title(report: dict[str, Any]) -> str:
    return (f"geomon inspect: {report['class']} ({report['parameters'] / 1e6:.3g} M parameters) from "
            f"{report['description']}")  # fmt: skip


def render(report: dict[str, Any], file: Any = None) -> None:
    """Print the report: rich tables when rich is installed, plain text otherwise."""
    file = file or sys.stdout
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title(report), file=file)
        for name, header, rows in sections(report):
            print(f"\n{name}", file=file)
            for row in ([header] if any(header) else []) + rows:
                print("  " + " | ".join(cell.replace("\n", ", ") for cell in row), file=file)
        for note in report["notes"]:
            print(f"note: {note}", file=file)
        return
    console = Console(file=file, width=max(100, Console(file=file).width))
    console.print(title(report), style="bold", markup=False, highlight=False)
    for name, header, rows in sections(report):
        table = Table(title=name, title_justify="left", show_header=any(header))
        for column in header:
            table.add_column(column, overflow="fold")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    for note in report["notes"]:
        console.print(f"note: {note}", markup=False, highlight=False)
    console.print(f"cost model: {report['cost']['formula']}", markup=False, highlight=False, style="dim")
