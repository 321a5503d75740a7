"""W&B dashboards that read at a glance: run-side logging for the integrations, and the recommended workspace.

What a W&B run gets (rank zero, from :class:`WandbDashboard`, which the Lightning callback drives and other
integrations can drive the same way):

- **summaries that apply**: ``run.define_metric`` for every *exact* key, its dots escaped. W&B reads a ``.`` in a
  metric name as a nested-key separator, and its ``*`` globs never match a key that contains one, so the
  ``geomon/attention/entropy_normalized/*`` glob left every module-path key at its last value. Per family the
  summary is the worst value the run reached (:data:`SUMMARIES`); every key is plotted against the step metric;
- **an overview section**: a fixed set of :data:`OVERVIEW` keys under ``geomon-overview/`` (W&B sections a
  workspace by a key's first ``/`` segment), reduced from the values just logged, however deep the model;
- **per-head tables**: ``geomon-heads/entropy_normalized`` and ``geomon-heads/max_logit``, incremental
  ``wandb.Table`` s with columns ``step, layer, head, value`` (each logging step appends its rows);
- **the configuration**: every option under ``geomon`` in the run config (:func:`monitor_settings`).

The workspace: :func:`workspace_sections` lists the recommended sections and panels as plain data;
:func:`recommended_workspace` turns them into a ``wandb_workspaces`` workspace (no network) and
:func:`save_workspace` saves it to W&B (network and a login needed).

Example:
    >>> summary_of("geomon/attention/max_logit/blocks.0.attn"), escape("geomon/rankme/lm_head.input")
    ('max', 'geomon/rankme/lm_head\\\\.input')
    >>> overview({"geomon/attention/entropy_normalized/a.0": 0.8, "geomon/attention/entropy_normalized/a.1": 0.2})
    {'geomon-overview/entropy_normalized_min': 0.2, 'geomon-overview/entropy_normalized_mean': 0.5}
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Mapping
from typing import Any, Literal, NamedTuple

from torch import Tensor

from geomon import keys
from geomon.probes.collapse import STATS

OVERVIEW_PREFIX = "geomon-overview/"  #: the overview keys' section (W&B sections by the first ``/`` segment)
HEADS_PREFIX = "geomon-heads/"  #: the per-head tables' section
LIGHTNING_STEP = "trainer/global_step"  #: the step metric Lightning's ``WandbLogger`` logs
HEAT_MAP = keys.key(keys.MEDIA, "entropy_heatmap")
SPECTRA = keys.key(keys.MEDIA, "spectra")

#: Run summary per family: the worst value a run reached (other families keep W&B's default, the last value).
SUMMARIES: dict[str, Literal["min", "max"]] = {
    keys.ENTROPY: "min",
    keys.ENTROPY_NORMALIZED: "min",
    keys.MAX_LOGIT: "max",
    keys.RANKME: "min",
    keys.RANKME_COV: "min",
    keys.LOGIT_SIGMA: "max",
}

TABLE_COLUMNS = ["step", "layer", "head", "value"]
#: Families with per-head values that go into a ``geomon-heads/<family name>`` table.
HEAD_TABLES = (keys.ENTROPY_NORMALIZED, keys.MAX_LOGIT)


class Overview(NamedTuple):
    """One overview key: ``reduce`` of a family's values over its targets."""

    name: str
    family: str
    reduce: Literal["min", "mean", "max", "sum", "head"]  #: ``head``: the head input's value (else the minimum)
    summary: Literal["min", "max"] | None
    meaning: str


OVERVIEW = (
    Overview("entropy_normalized_min", keys.ENTROPY_NORMALIZED, "min", "min",
             "normalised attention entropy of the worst layer"),
    Overview("entropy_normalized_mean", keys.ENTROPY_NORMALIZED, "mean", "min",
             "normalised attention entropy averaged over layers"),
    Overview("max_logit_max", keys.MAX_LOGIT, "max", "max", "largest attention logit of any layer"),
    Overview("logit_sigma_max", keys.LOGIT_SIGMA, "max", "max", "largest logit-map spectral norm of any layer"),
    Overview("rankme", keys.RANKME, "head", "min", "RankMe of the head input"),
    Overview("alpha_req", keys.ALPHA_REQ, "head", None, "alpha-ReQ of the head input"),
    Overview("nc1", keys.nc("nc1"), "head", None, "neural collapse NC1 of the head input"),
    Overview("alerts", keys.ALERTS, "sum", "max", "alerts fired so far, all rules together"),
)  # fmt: skip


def escape(name: str) -> str:
    """``name`` as ``define_metric`` must spell it to mean that exact key (W&B splits unescaped dots)."""
    return name.replace(".", "\\.")


def summary_of(name: str) -> Literal["min", "max"] | None:
    """The run summary of a logged key (``None``: W&B's default)."""
    if name.startswith(OVERVIEW_PREFIX):
        return next((item.summary for item in OVERVIEW if OVERVIEW_PREFIX + item.name == name), None)
    if not keys.is_geomon(name) or "/" not in name[len(keys.ROOT) :]:
        return None
    return SUMMARIES.get(keys.split(name)[0])


def overview(values: Mapping[str, float], head: str | None = None) -> dict[str, float]:
    """The :data:`OVERVIEW` keys that ``values`` (one logging step's scalars) can give; at most one per item."""
    out: dict[str, float] = {}
    for item in OVERVIEW:
        found = {
            name.removeprefix(keys.prefix(item.family)): float(value)
            for name, value in values.items()
            if name.startswith(keys.prefix(item.family)) and "/" not in name[len(keys.prefix(item.family)) :]
        }
        finite = [value for value in found.values() if math.isfinite(value)]
        if not finite:
            continue
        if item.reduce == "head":
            value = found.get(f"{head}.input", min(finite)) if head is not None else min(finite)
        elif item.reduce == "mean":
            value = sum(finite) / len(finite)
        else:
            value = {"min": min, "max": max, "sum": sum}[item.reduce](finite)
        out[OVERVIEW_PREFIX + item.name] = value
    return out


def config_value(value: Any) -> Any:
    """A config-safe form of an option value (callables by name, sequences as lists)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [config_value(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): config_value(v) for k, v in value.items()}
    if callable(value):
        return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', type(value).__name__)}"
    return repr(value)


def _rule(rule: Any) -> dict[str, Any]:
    settings = {"type": type(rule).__name__, "name": getattr(rule, "name", None)}
    for name, value in vars(rule).items():
        if not name.startswith("_") and (value is None or isinstance(value, (bool, int, float, str, tuple))):
            settings[name] = config_value(value)
    return settings


def monitor_settings(monitor: Any) -> dict[str, Any]:
    """Every argument of the monitor's constructor as it was set (the alert rules described one by one), plus
    the head it found."""
    settings: dict[str, Any] = {}
    for name in list(inspect.signature(type(monitor).__init__).parameters)[1:]:
        if name == "alerts":
            settings["alerts"] = [_rule(rule) for rule in monitor.alert_engine.rules]
        elif hasattr(monitor.options, name):
            settings[name] = config_value(getattr(monitor.options, name))
        elif hasattr(monitor, name):
            settings[name] = config_value(getattr(monitor, name))
    settings["resolved_head"] = monitor.head
    return settings


class WandbDashboard:
    """The W&B side of one monitored run (rank zero): call :meth:`setup` once attached, :meth:`define` with each
    logging step's scalars *before* they are logged (so that their summaries count the first value), and
    :meth:`log` after.

    Args:
        run: the ``wandb`` run (``WandbLogger.experiment``, ``wandb.run``).
        step_metric: the key holding the training step in the run's history (Lightning: ``trainer/global_step``).
        head: the output head's name (its input's RankMe, alpha-ReQ and NC1 go to the overview).
        prefix: what the logger puts before each key it logs (Lightning's ``WandbLogger(prefix="p")`` logs
            ``p-geomon/...``): the values' summaries are defined under those names; the overview and tables, which
            the dashboard logs itself, have none.
    """

    def __init__(self, run: Any, *, step_metric: str = LIGHTNING_STEP, head: str | None = None,
                 prefix: str = "") -> None:  # fmt: skip
        self.run, self.step_metric, self.head = run, step_metric, head
        self.prefix = prefix
        self.defined: set[str] = set()
        self.tables: dict[str, Any] = {}
        self.incremental = True

    def setup(self, settings: Mapping[str, Any], names: Iterable[str] = ()) -> None:
        """Put ``settings`` under ``geomon`` in the run config and define the keys known up front."""
        self.run.config.update({"geomon": dict(settings)}, allow_val_change=True)
        self.run.define_metric(self.step_metric)
        self.define(names)
        self.define((OVERVIEW_PREFIX + item.name for item in OVERVIEW), own=True)

    def define(self, names: Iterable[str], *, own: bool = False) -> None:
        """Define the keys not defined yet: plotted against the step metric, summarised per :func:`summary_of`;
        ``own``: keys the dashboard logs itself (no logger prefix)."""
        for name in names:
            logged = name if own or not self.prefix else self.prefix + name
            if logged in self.defined:
                continue
            self.defined.add(logged)
            summary = summary_of(name)
            options = {"summary": summary} if summary else {}
            self.run.define_metric(escape(logged), step_metric=self.step_metric, **options)

    def log(self, step: int, values: Mapping[str, float], heads: Mapping[str, Tensor]) -> None:
        """Log the overview of this step's ``values`` and append its per-head values to the tables."""
        row: dict[str, Any] = overview(values, self.head)
        self.define(row, own=True)
        row.update(self._tables(step, heads))
        if row:
            self.run.log({**row, self.step_metric: step})

    def _tables(self, step: int, heads: Mapping[str, Tensor]) -> dict[str, Any]:
        import wandb

        logged = {}
        for family in HEAD_TABLES:
            found = {name: values for name, values in heads.items() if name.startswith(keys.prefix(family))}
            if not found:
                continue
            key = HEADS_PREFIX + family.rsplit("/", 1)[-1]
            if key not in self.tables or not self.incremental:
                try:  # each log appends only the new rows (wandb >= 0.20)
                    self.tables[key] = wandb.Table(columns=TABLE_COLUMNS, log_mode="INCREMENTAL")
                except TypeError:  # an older wandb: one table of this step's rows per step
                    self.incremental = False
                    self.tables[key] = wandb.Table(columns=TABLE_COLUMNS)
            for name, values in found.items():
                for head, value in enumerate(values.tolist()):
                    self.tables[key].add_data(step, keys.split(name)[1], head, value)
            logged[key] = self.tables[key]
        return logged


# the recommended workspace -----------------------------------------------------------------------------------------
#: Neural-collapse statistics, one panel each (they do not share a scale; ``coincident_pairs`` is a count).
COLLAPSE_STATS = STATS


class Panel(NamedTuple):
    """One panel: a line plot of exact ``keys`` or of every key matching ``regex``, a media browser, or a table."""

    title: str
    kind: Literal["line", "media", "table"]
    keys: tuple[str, ...] = ()
    regex: str | None = None
    log_y: bool = False


class Section(NamedTuple):
    name: str
    panels: tuple[Panel, ...]
    pinned: bool = False
    is_open: bool = False


def _family_plot(title: str, family: str, log_y: bool = False) -> Panel:
    return Panel(title, "line", regex=keys.prefix(family).replace(".", "\\.") + ".*", log_y=log_y)


def workspace_sections() -> tuple[Section, ...]:
    """The recommended workspace, top to bottom; one line plot per family, so the count never depends on depth."""
    top = [
        Panel(item.meaning, "line", keys=(OVERVIEW_PREFIX + item.name,), log_y=item.name == "max_logit_max")
        for item in OVERVIEW
    ]
    attention = [
        _family_plot("normalised attention entropy, per layer", keys.ENTROPY_NORMALIZED),
        _family_plot("max attention logit, per layer", keys.MAX_LOGIT, log_y=True),
        _family_plot("attention entropy (nats), per layer", keys.ENTROPY),
        _family_plot("logit-map spectral norm, per layer", keys.LOGIT_SIGMA, log_y=True),
        Panel("normalised entropy per head", "media", keys=(HEAT_MAP,)),
    ]
    tables = [
        Panel(f"{family} per head", "table", keys=(HEADS_PREFIX + family.rsplit("/", 1)[-1],)) for family in HEAD_TABLES
    ]
    embeddings = [
        _family_plot("RankMe", keys.RANKME),
        _family_plot("RankMe of the centred covariance", keys.RANKME_COV),
        _family_plot("alpha-ReQ", keys.ALPHA_REQ),
        Panel("singular value spectra", "media", keys=(SPECTRA,)),
    ]
    weights = [("σ(W)", keys.SIGMA), ("stable rank", keys.STABLE_RANK), ("entropy lower bound", keys.ENTROPY_BOUND),
               ("σReparam γ", keys.reparam("gamma")), ("σReparam σ", keys.reparam("sigma")),
               ("σReparam ratio", keys.reparam("ratio"))]  # fmt: skip
    return (
        Section("geomon-overview", (*top, Panel("which heads", "media", keys=(HEAT_MAP,))), True, True),
        Section("geomon attention", tuple(attention), is_open=True),
        Section("geomon per-head values", tuple(tables)),
        Section("geomon embeddings", tuple(embeddings)),
        Section("geomon neural collapse", tuple(_family_plot(stat, keys.nc(stat)) for stat in COLLAPSE_STATS)),
        Section("geomon weights", tuple(_family_plot(title, family, log_y=True) for title, family in weights)),
        Section("geomon alerts", (_family_plot("alerts fired, per rule", keys.ALERTS),)),
    )


def recommended_workspace(entity: str, project: str, *, name: str = "geomon", step_metric: str = LIGHTNING_STEP) -> Any:
    """:func:`workspace_sections` as a ``wandb_workspaces.workspaces.Workspace`` (``pip install
    wandb-workspaces``); building it needs no network."""
    try:
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
    except ImportError as error:
        raise ImportError("the W&B workspace API is needed: pip install 'geomon[wandb]' (wandb-workspaces)") from error

    def panel(spec: Panel) -> Any:
        if spec.kind == "media":
            return wr.MediaBrowser(title=spec.title, media_keys=list(spec.keys))
        if spec.kind == "table":
            return wr.WeavePanelSummaryTable(table_name=spec.keys[0])
        if spec.regex is not None:
            return wr.LinePlot(title=spec.title, x=step_metric, metric_regex=spec.regex, log_y=spec.log_y or None)
        return wr.LinePlot(title=spec.title, x=step_metric, y=list(spec.keys), log_y=spec.log_y or None)

    sections = [
        ws.Section(name=section.name, panels=[panel(p) for p in section.panels], pinned=section.pinned,
                   is_open=section.is_open)
        for section in workspace_sections()
    ]  # fmt: skip
    return ws.Workspace(entity=entity, project=project, name=name, sections=sections,
                        settings=ws.WorkspaceSettings(x_axis=step_metric))  # fmt: skip


def save_workspace(entity: str, project: str, *, name: str = "geomon", step_metric: str = LIGHTNING_STEP) -> str:
    """Save :func:`recommended_workspace` as a new view of ``entity/project`` (network and a W&B login needed);
    returns its URL."""
    return recommended_workspace(entity, project, name=name, step_metric=step_metric).save().url


__all__ = [
    "OVERVIEW", "WandbDashboard", "monitor_settings", "overview", "recommended_workspace", "save_workspace",
    "workspace_sections",
]  # fmt: skip
