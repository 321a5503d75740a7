"""Step-time overhead of ``GeomonCallback`` through a real Lightning ``Trainer``, both arms interleaved in one process.

Two Trainers fit two identically initialised copies of a GPT (:class:`geomon._tiny_gpt.TinyGPT`, attention through
SDPA) on the same batches in the same order: the *plain* arm has no callback but the timer, the *geomon* arm also has
a :class:`geomon.GeomonCallback`. Both use the same Lightning code path (``Trainer.fit``, a ``CSVLogger``, no progress
bar, no checkpointing) and run in their own thread, but never at the same time: a baton hands the CPU (or GPU) from
one arm to the other every ``block`` steps, in ABBA order (plain, geomon, geomon, plain, ...), so both arms share the
machine's load and drift. A pair of blocks (one of each arm) is the unit of the bootstrap.

A step's time is taken by a timer callback that comes first in the callback list: from ``on_train_batch_start`` of
one step to ``on_train_batch_start`` of the next (so it includes the optimizer step, ``on_train_batch_end`` - where
geomon computes and logs - and Lightning's loop and data fetch). The last step of each block is timed before the
baton is handed on. On CUDA ``torch.cuda.synchronize()`` precedes each reading.

Whole-run mean ratio, paired. With ``every_n_steps = P`` a run has three kinds of geomon step: *measured* (1 in P),
*fill* (the steps just before a measured one that feed the head input's window when one step has fewer rows than the
window, see :meth:`geomon.Monitor.fills`) and *idle* (the rest). The whole-run mean of a geomon step is the mean of each
kind weighted by its share of a period. Each kind is compared with the plain steps of its own pair of blocks (adjacent
in time, so that the machine's drift between pairs cancels): ``ratio = 1 + Σ_kind share_kind · Δ_kind / plain mean``,
``Δ_kind`` the mean over the pairs holding that kind of (its mean there - the pair's plain mean). Weighting by the
schedule's exact shares (rather than by how many of each kind the timed blocks happened to hold) keeps the few measured
steps from dominating the interval. A kind's cost does not depend on the period (a fill step ``k`` steps before a
measured one does the same work at any period), so ``--measure-every N`` lets the geomon arm measure every ``N`` steps -
more measured steps per minute of machine - while the shares stay those of the configuration's own schedule (a period
shorter than a window's fill, or without a kind the schedule has, is refused). The 95% interval is a percentile
bootstrap over the pairs of blocks. ``--raw FILE`` writes every timed step (JSON) for re-analysis.

Idle steps as their hook time. On an idle step geomon arms no module hook: its work there is its two per-step
callback hooks, which are timed (:class:`HookClock`). A second ratio counts each idle step as its pair's plain mean
plus that time, which removes the idle steps' noise (they are 76% of a default period at GPT-2-small's shape) on the
assumption - which the first ratio tests, with its wider interval - that an idle step costs nothing beyond its hooks.

Two clocks. Each step is timed on the wall clock and in process CPU time (``time.process_time``: every thread of
the process, so geomon's work is counted wherever it runs; the other arm's thread is parked on the baton meanwhile).
On a shared CPU machine the wall clock also counts the time other processes hold the core, which no monitoring
causes; CPU time does not. On CUDA only the wall clock (after a device synchronize) means anything.

The run plans its own length: a pilot of ``pilot`` pairs (and at least one whole period) gives the spread, from which
the number of pairs that brings the interval's half-width under ``--target`` (default 0.4%) follows; it is capped by
``--max-minutes`` per configuration. The interval achieved is printed and written, whatever it is.

Geomon must not change training: at the end both models' weights are compared (bit-identical on the CPU).

Usage (from the repository root)::

    .venv/bin/python benchmarks/trainer_overhead.py --threads 1          # CPU: GPT-2-small shape, seq 256, batch 1
    .venv/bin/python benchmarks/trainer_overhead.py --threads 1 --configs default --measure-every 25
    .venv/bin/python benchmarks/trainer_overhead.py --shape tiny         # TinyGPT d 128, 4 layers, seq 128
    .venv/bin/python benchmarks/trainer_overhead.py --device cuda        # GPT-2-small, seq 1024, bf16 autocast
    .venv/bin/python benchmarks/trainer_overhead.py --quick              # smoke test, a few seconds
    .venv/bin/python benchmarks/trainer_overhead.py --profile            # where a monitored step's time goes

Tokens are drawn from a Zipf law over the vocabulary (50257, GPT-2's size, for the GPT-2-small shape), so the head is
GPT-2's and the class counts look like a language's; neural collapse's ``auto`` rule leaves it off at that vocabulary
(a 50257 x 768 float64 state), as it would for GPT-2.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import math
import os
import platform
import random
import shlex
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _machine import cpu_model, loadavg, write_results

from geomon import GeomonCallback
from geomon._tiny_gpt import TinyGPT

try:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger
except ImportError:  # pragma: no cover - the dev extras install lightning
    import pytorch_lightning as pl  # type: ignore[no-redef]
    from pytorch_lightning.loggers import CSVLogger  # type: ignore[no-redef]

BOOTSTRAP, SEED = 2000, 0
CLOCKS = {"wall": "wall clock", "cpu": "process CPU time"}


@dataclass(frozen=True)
class Shape:
    d_model: int
    layers: int
    heads: int
    context: int
    vocab: int
    batch: int
    block: int  #: steps per arm per block


SHAPES = {
    ("gpt2-small", "cpu"): Shape(768, 12, 12, 256, 50257, 1, 2),
    ("gpt2-small", "cuda"): Shape(768, 12, 12, 1024, 50257, 8, 10),
    ("tiny", "cpu"): Shape(128, 4, 4, 128, 96, 8, 10),
    ("tiny", "cuda"): Shape(128, 4, 4, 128, 96, 8, 10),
    ("quick", "cpu"): Shape(32, 2, 2, 32, 64, 2, 4),
    ("quick", "cuda"): Shape(32, 2, 2, 32, 64, 2, 4),
}


def every_probe(layers: int) -> dict[str, Any]:
    """Every kind of probe on every step: attention, the head input's RankMe (and neural collapse where ``auto``
    keeps it), RankMe of the residual stream after every block (the blocks, not their submodules) and σ(W) of every
    2-D weight."""
    blocks = [f"model.blocks.{i}" for i in range(layers)]
    return {"every_n_steps": 1, "embedding_modules": blocks, "spectral_modules": ["*"]}


def configurations(layers: int) -> dict[str, tuple[str, dict[str, Any]]]:
    return {"default": ("default GeomonCallback()", {}), "every": ("every probe, every step", every_probe(layers))}


# -- the model and its data -----------------------------------------------------------------------------------------
class LitGPT(pl.LightningModule):
    """TinyGPT trained on next-token prediction with AdamW; ``stop`` ends the epoch (hook returns -1)."""

    def __init__(self, model: TinyGPT) -> None:
        super().__init__()
        self.model, self.stop = model, False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self.model(x)
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
        return -1 if self.stop else None

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=3e-4)


def gpt(shape: Shape) -> TinyGPT:
    """The shape's TinyGPT with the head tied to the token embedding, as in GPT-2 (124 M parameters at GPT-2-small's
    shape)."""
    model = TinyGPT(shape.vocab, d_model=shape.d_model, n_layer=shape.layers, n_head=shape.heads, context=shape.context)
    model.head.weight = model.tok.weight
    return model


def zipf_tokens(vocab: int, length: int, seed: int) -> torch.Tensor:
    """``length`` token ids with ``P(k) ∝ 1 / (k + 1)``, as word frequencies roughly go."""
    weights = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    return torch.multinomial(weights, length, replacement=True, generator=torch.Generator().manual_seed(seed))


class Windows(torch.utils.data.IterableDataset):
    """Endless random windows of ``tokens`` and their next-token targets, the same sequence for every copy."""

    def __init__(self, tokens: torch.Tensor, context: int, batch: int) -> None:
        self.tokens, self.context, self.batch = tokens, context, batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(SEED)
        offsets = torch.arange(self.context + 1)
        while True:
            start = torch.randint(0, self.tokens.numel() - self.context - 1, (self.batch, 1), generator=generator)
            window = self.tokens[start + offsets]
            yield window[:, :-1], window[:, 1:]


# -- interleaving ---------------------------------------------------------------------------------------------------
class Baton:
    """Hands the machine from one arm to the other, one block at a time, in ABBA order, until ``pairs`` pairs ran.

    Turn ``t`` belongs to arm ``t % 2`` in even pairs and to the other arm in odd ones. ``planner(pairs_done)``,
    called after each completed pair, returns the total number of pairs to run (it may grow it once)."""

    def __init__(self, planner: Any, timeout_s: float) -> None:
        self.condition = threading.Condition()
        self.turn, self.active, self.pairs, self.planner = 0, None, 1, planner
        self.aborted, self.timeout_s = False, timeout_s

    def holder(self) -> int:
        pair, position = divmod(self.turn, 2)
        return position if pair % 2 == 0 else 1 - position

    def next_block(self, arm: int) -> bool:
        """Called by ``arm`` at each block boundary: ends its turn (if it held one) and waits for its next; ``False``
        when the run is over."""
        with self.condition:
            if self.active == arm:
                self.active, self.turn = None, self.turn + 1
                if self.turn % 2 == 0:
                    self.pairs = self.planner(self.turn // 2)
                self.condition.notify_all()
            done = self.condition.wait_for(
                lambda: self.aborted or self.turn >= 2 * self.pairs or self.holder() == arm, timeout=self.timeout_s
            )
            if not done or self.aborted or self.turn >= 2 * self.pairs:
                self.condition.notify_all()
                return False
            self.active = arm
            return True

    def abort(self) -> None:
        with self.condition:
            self.aborted = True
            self.condition.notify_all()


@dataclass
class StepLog:
    """Per-step times of one arm: (pair index, kind, {clock: seconds})."""

    steps: list[tuple[int, str, dict[str, float]]] = field(default_factory=list)


class HookClock:
    """Time spent inside a callback's per-step hooks (``on_train_batch_start`` / ``_end``) on both clocks, taken per
    step: on an idle step that is geomon's work (no module hook is armed)."""

    def __init__(self, callback: pl.Callback) -> None:
        self.seconds = {"wall": 0.0, "cpu": 0.0}
        for name in ("on_train_batch_start", "on_train_batch_end"):
            setattr(callback, name, self._timed(getattr(callback, name)))  # Lightning calls the instance's attribute

    def _timed(self, hook: Any) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return hook(*args, **kwargs)
            finally:
                self.seconds["wall"] += time.perf_counter() - wall
                self.seconds["cpu"] += time.process_time() - cpu

        return run

    def take(self) -> dict[str, float]:
        seconds, self.seconds = self.seconds, {"wall": 0.0, "cpu": 0.0}
        return seconds


class BlockTimer(pl.Callback):
    """First in the callback list: times each step start to start and hands the baton on every ``block`` steps."""

    def __init__(self, arm: int, baton: Baton, block: int, log: StepLog, kind: Any, cuda: bool,
                 hooks: HookClock | None = None) -> None:  # fmt: skip
        self.arm, self.baton, self.block, self.step_log, self.kind, self.cuda = arm, baton, block, log, kind, cuda
        self.hooks = hooks
        self.started: dict[str, float] | None = None
        self.step_kind = ""

    def _now(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
        return {"wall": time.perf_counter(), "cpu": time.process_time()}

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        now = self._now()
        if self.started is not None:
            seconds = {clock: now[clock] - self.started[clock] for clock in now}
            if self.hooks is not None:  # geomon's hooks of that step: its start (after this timer) and its end
                seconds |= {f"hooks {clock}": value for clock, value in self.hooks.take().items()}
            self.step_log.steps.append((self.baton.turn // 2, self.step_kind, seconds))
        elif self.hooks is not None:
            self.hooks.take()
        self.started = None
        if batch_idx % self.block == 0 and not self.baton.next_block(self.arm):
            pl_module.stop = True
            return
        self.step_kind = self.kind(trainer.global_step)
        self.started = self._now()


def _arm_kind(callback: GeomonCallback | None) -> Any:
    if callback is None:
        return lambda step: "plain"
    monitor = callback.monitor

    def kind(step: int) -> str:
        return "measured" if monitor.is_scheduled(step) else "fill" if monitor.fills(step) else "idle"

    return kind


def _trainer(callbacks: list[Any], root: Path, device: str) -> Any:
    return pl.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        max_epochs=1,
        precision="bf16-mixed" if device == "cuda" else "32-true",
        logger=CSVLogger(str(root), name="csv"),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        log_every_n_steps=50,
        default_root_dir=str(root),
    )


# -- statistics -----------------------------------------------------------------------------------------------------
def shares(callback: GeomonCallback, period: int | None = None) -> dict[str, float]:
    """Each kind of geomon step's share of a steady-state period of ``period`` steps (default: the callback's own
    ``every_n_steps``); read once the callback's monitor is attached (which steps fill depends on the plan). A step
    ``k`` steps before a measured one fills when a probe's lead reaches back ``k`` steps, whatever the period
    (:meth:`geomon.probes.plan.Plan.fill_probes`), so the shares of another period follow from the same plan."""
    plan = callback.monitor.plan
    if plan is None:
        raise RuntimeError("the monitor is not attached yet: its fill steps are unknown")
    period = period or callback.monitor.every_n_steps
    fill = sum(1 for k in range(1, period) if plan.fill_probes(k))
    counts = {"measured": 1, "fill": fill, "idle": period - 1 - fill}
    return {k: v / period for k, v in counts.items() if v}


def check_timed_period(callback: GeomonCallback, weighted_period: int) -> None:
    """A measured step does the schedule's work only when every windowed probe's rows fill within one period: a
    probe whose lead (steps of rows its window needs) exceeds the timed period computes on some measured steps only,
    which would make the measured-step mean too low. And every kind of step the weighted schedule has must occur in
    the timed one. Raises otherwise, saying what period is needed (a configuration timed at its own period is timed
    as it is)."""
    plan, period = callback.monitor.plan, callback.monitor.every_n_steps
    if plan is None:
        raise RuntimeError("the monitor is not attached yet: its probes' leads are unknown")
    if period == weighted_period:
        return  # the configuration's own schedule, whatever it does, is what is timed
    short = plan.fill_probes(period)  # leads longer than the period
    if short:
        need = max(p.lead_steps(1) for p in short)
        names = ", ".join(sorted({p.name for p in short}))
        raise ValueError(
            f"--measure-every {period} is shorter than the {need} steps the windows of {names} take to fill: their "
            f"measured steps would not all compute; use --measure-every {need} or more"
        )
    missing = set(shares(callback, weighted_period)) - set(shares(callback))
    if missing:
        raise ValueError(
            f"--measure-every {period} times no {' or '.join(sorted(missing))} step, which the schedule of every "
            f"{weighted_period} has; use a longer period"
        )


def whole_run_ratio(pairs: list[dict[str, list[float]]], weights: dict[str, float]) -> float | None:
    """``1 + Σ_kind share_kind · Δ_kind / mean_plain`` over ``pairs``, ``Δ_kind`` the mean over the pairs that hold
    that kind of step of (its mean there - the pair's plain mean): each kind is compared with the plain steps of its
    own pair of blocks, adjacent in time, so that the machine's drift between pairs cancels (with a steady machine
    it equals ``Σ_kind share_kind · mean_kind / mean_plain``). ``None`` when a kind has no step in ``pairs``."""
    plain = [t for pair in pairs for t in pair.get("plain", [])]
    if not plain:
        return None
    total = 0.0
    for kind, share in weights.items():
        gaps = [
            statistics.fmean(p[kind]) - statistics.fmean(p["plain"]) for p in pairs if p.get(kind) and p.get("plain")
        ]
        if not gaps:
            return None
        total += share * statistics.fmean(gaps)
    return 1.0 + total / statistics.fmean(plain)


def interval(pairs: list[dict[str, list[float]]], weights: dict[str, float]) -> tuple[float, float]:
    """95% percentile-bootstrap interval of :func:`whole_run_ratio`, resampling pairs of blocks."""
    rng, samples = random.Random(SEED), []
    for _ in range(20 * BOOTSTRAP):
        value = whole_run_ratio(rng.choices(pairs, k=len(pairs)), weights)
        if value is not None:
            samples.append(value)
        if len(samples) == BOOTSTRAP:
            break
    if len(samples) < BOOTSTRAP // 2:
        return math.nan, math.nan
    samples.sort()
    return samples[int(0.025 * len(samples))], samples[int(0.975 * len(samples)) - 1]


def group_pairs(plain: StepLog, geomon: StepLog, warmup_pairs: int, clock: str) -> list[dict[str, list[float]]]:
    """Per pair of blocks, each kind's step times in ms on ``clock`` ("wall" or "cpu")."""
    grouped: dict[int, dict[str, list[float]]] = {}
    for log in (plain, geomon):
        for pair, kind, seconds in log.steps:
            if pair >= warmup_pairs:
                grouped.setdefault(pair, {}).setdefault(kind, []).append(seconds.get(clock, 0.0) * 1e3)
    return [grouped[p] for p in sorted(grouped) if "plain" in grouped[p] and len(grouped[p]) > 1]


class Planner:
    """Runs ``pilot`` timed pairs (at least one period), then as many as the pilot says the target half-width needs,
    within ``max_seconds``."""

    def __init__(self, plain: StepLog, geomon: StepLog, callback: GeomonCallback, args: Any, block: int,
                 weighted_period: int) -> None:  # fmt: skip
        self.plain, self.geomon, self.callback, self.args = plain, geomon, callback, args
        self.weighted_period = weighted_period
        self.pilot = max(args.pilot, math.ceil(callback.monitor.every_n_steps / block) + 1)
        self.total: int | None = args.pairs
        self.started = time.perf_counter()
        self.planned_from: str = "--pairs" if args.pairs else ""

    def __call__(self, pairs_done: int) -> int:
        if pairs_done == 1:  # the monitor is attached by now
            check_timed_period(self.callback, self.weighted_period)
        if self.total is not None:
            return self.total
        timed = pairs_done - self.args.warmup_pairs
        if timed < self.pilot:
            return pairs_done + 1
        pairs = group_pairs(self.plain, self.geomon, self.args.warmup_pairs, self.args.clock)
        low, high = interval(pairs, shares(self.callback, self.weighted_period))
        half = (high - low) / 2
        per_pair = (time.perf_counter() - self.started) / pairs_done
        budget = int(self.args.max_minutes * 60 / per_pair)
        needed = math.ceil(len(pairs) * (half / self.args.target) ** 2) if half == half else budget
        self.total = self.args.warmup_pairs + max(len(pairs), min(needed, budget))
        self.planned_from = (
            f"pilot of {len(pairs)} pairs: half-width {100 * half:.2f}% -> {needed} pairs for "
            f"±{100 * self.args.target:.2f}%, {budget} fit in {self.args.max_minutes:g} min; ran {self.total} "
            f"({self.args.warmup_pairs} warm-up)"
        )
        return self.total


# -- one configuration ----------------------------------------------------------------------------------------------
def run_configuration(options: dict[str, Any], shape: Shape, device: str, tokens: torch.Tensor, args: Any) -> dict:
    torch.manual_seed(SEED)
    model = gpt(shape)
    modules = [LitGPT(model), LitGPT(copy.deepcopy(model))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        own_period = GeomonCallback(**options).monitor.every_n_steps  # the schedule the ratio is for
        timed_period = min(args.measure_every or own_period, own_period)
        if timed_period != own_period and shape.block > 1 and timed_period % shape.block == 0:
            raise ValueError(
                f"--measure-every {timed_period} is a multiple of the block length {shape.block}: every measured step "
                "would be the first after a hand-off between the arms; use a period the block does not divide"
            )
        callback = GeomonCallback(**{**options, "every_n_steps": timed_period})
    logs = [StepLog(), StepLog()]
    hooks = HookClock(callback)
    planner = Planner(logs[0], logs[1], callback, args, shape.block, own_period)
    baton = Baton(planner, timeout_s=600)
    errors: list[BaseException] = []
    root = Path(tempfile.mkdtemp(prefix="geomon-trainer-overhead-"))

    def fit(arm: int) -> None:
        try:
            torch.set_num_threads(args.threads or torch.get_num_threads())  # OpenMP settings are per thread
            timer = BlockTimer(arm, baton, shape.block, logs[arm], _arm_kind(callback if arm else None),
                               device == "cuda", hooks if arm else None)  # fmt: skip
            trainer = _trainer([timer, callback] if arm else [timer], root / f"arm{arm}", device)
            loader = torch.utils.data.DataLoader(Windows(tokens, shape.context, shape.batch), batch_size=None)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                trainer.fit(modules[arm], train_dataloaders=loader)
        except BaseException as error:  # re-raised in the main thread
            errors.append(error)
            baton.abort()

    threads = [threading.Thread(target=fit, args=(arm,), name=f"arm{arm}") for arm in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    with torch.no_grad():
        delta = max(
            (a.float() - b.float()).abs().max().item()
            for a, b in zip(modules[0].model.parameters(), modules[1].model.parameters(), strict=True)
        )
    clocks = ("wall",) if device == "cuda" else tuple(CLOCKS)
    return {
        "pairs": {clock: group_pairs(logs[0], logs[1], args.warmup_pairs, clock) for clock in clocks},
        "hooks": {clock: group_pairs(logs[0], logs[1], args.warmup_pairs, f"hooks {clock}") for clock in clocks},
        "weights": shares(callback, own_period),
        "periods": (callback.monitor.every_n_steps, own_period),
        "delta": delta,
        "planned": planner.planned_from,
        "raw": {
            arm: [(pair, kind, seconds) for pair, kind, seconds in log.steps]
            for arm, log in zip(("plain", "geomon"), logs, strict=True)
        },
    }


def idle_as_hooks(pairs: list[dict[str, list[float]]], hook_pairs: list[dict[str, list[float]]]) -> list[dict]:
    """``pairs`` with each idle step's time replaced by its pair's plain mean plus geomon's hook time on that step:
    the whole-run ratio then counts an idle step as the work geomon does on it, without the step's noise."""
    out = []
    for pair, hooks in zip(pairs, hook_pairs, strict=True):
        pair = dict(pair)
        if pair.get("idle"):
            base = statistics.fmean(pair["plain"])
            pair["idle"] = [base + t for t in hooks["idle"]]
        out.append(pair)
    return out


def summarise(name: str, result: dict[str, Any], clock: str) -> dict[str, Any]:
    """The configuration's row: step counts and means on ``clock`` (the one the run planned on), the whole-run ratio
    and its interval on every clock."""
    weights = result["weights"]
    pairs = result["pairs"][clock]
    by_kind = {kind: [t for p in pairs for t in p.get(kind, [])] for kind in ("plain", *weights)}
    plain = statistics.fmean(by_kind["plain"])
    ratios = {}
    for name_of_clock, clock_pairs in result["pairs"].items():
        ratio = whole_run_ratio(clock_pairs, weights)
        ratios[name_of_clock] = (math.nan if ratio is None else ratio, *interval(clock_pairs, weights))
    idle_hooks = [t for p in result["hooks"][clock] for t in p.get("idle", [])]
    assisted = (math.nan, math.nan, math.nan)
    if idle_hooks:
        assisted_pairs = idle_as_hooks(pairs, result["hooks"][clock])
        value = whole_run_ratio(assisted_pairs, weights)
        assisted = (math.nan if value is None else value, *interval(assisted_pairs, weights))
    return {
        "idle_hooks_us": statistics.fmean(idle_hooks) * 1e3 if idle_hooks else math.nan,
        "assisted": assisted,
        "name": name,
        "clock": clock,
        "pairs": len(pairs),
        "steps": len(by_kind["plain"]),
        "plain_ms": plain,
        "kinds": {k: (len(v), statistics.fmean(v) if v else math.nan) for k, v in by_kind.items() if k != "plain"},
        "weights": weights,
        "periods": result["periods"],
        "ratio": ratios[clock][0],
        "ci": ratios[clock][1:],
        "ratios": ratios,
        "measured_ratio": statistics.fmean(by_kind["measured"]) / plain if by_kind.get("measured") else math.nan,
        "delta": result["delta"],
        "planned": result["planned"],
    }


def table(rows: list[dict[str, Any]]) -> list[str]:
    """One row per configuration; step means on the clock the run planned on, whole-run ratios on both clocks."""
    clock = rows[0]["clock"] if rows else "wall"
    clocks = list(rows[0]["ratios"]) if rows else ["wall"]
    head = ["configuration", "timed at every / weighted for every", "pairs", "plain steps",
            f"plain ms (mean, {CLOCKS[clock]})", "measured / fill / idle steps", "measured / fill / idle ms",
            "measured / plain", *(f"whole-run ratio, {CLOCKS[c]} [95% CI]" for c in clocks),
            "max abs Δweight", "idle step: geomon's hooks (µs)",
            f"whole-run ratio, idle steps as their hook time, {CLOCKS[clock]} [95% CI]"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        kinds = ("measured", "fill", "idle")
        counts = " / ".join(str(r["kinds"].get(k, (0,))[0]) for k in kinds)
        means = " / ".join(f"{r['kinds'].get(k, (0, math.nan))[1]:.1f}" for k in kinds)
        ratios = [f"{v:.4f} [{lo:.4f}, {hi:.4f}]" for v, lo, hi in (r["ratios"][c] for c in clocks)]
        cells = [r["name"], "{} / {}".format(*r["periods"]), str(r["pairs"]), str(r["steps"]), f"{r['plain_ms']:.1f}",
                 counts, means, f"{r['measured_ratio']:.3f}", *ratios, f"{r['delta']:.1e}",
                 f"{r['idle_hooks_us']:.1f}", "{:.4f} [{:.4f}, {:.4f}]".format(*r["assisted"])]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return lines


# -- where a monitored step's time goes -----------------------------------------------------------------------------
def profile(shape: Shape, device: str, tokens: torch.Tensor, options: dict[str, Any], steps: int) -> list[str]:
    """torch.profiler over ``steps`` monitored steps (after two warm-up steps) of a Trainer with the callback; each
    probe's ``update`` / ``compute`` and the callback's hooks are wrapped in ``record_function`` ranges."""
    from geomon import probes

    wrapped = []
    for cls in (probes.AttentionProbe, probes.EmbeddingProbe, probes.CollapseProbe, probes.SpectralProbe,
                probes.LogitMapProbe, GeomonCallback):  # fmt: skip
        for method in ("update", "compute", "on_train_batch_start", "on_train_batch_end"):
            original = cls.__dict__.get(method)
            if original is None:
                continue

            def make(fn: Any, label: str) -> Any:
                def run(*a: Any, **k: Any) -> Any:
                    with torch.profiler.record_function(label):
                        return fn(*a, **k)

                return run

            setattr(cls, method, make(original, f"geomon:{cls.__name__}.{method}"))
            wrapped.append((cls, method, original))
    torch.manual_seed(SEED)
    model = LitGPT(gpt(shape))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        callback = GeomonCallback(**options)

    class Window(pl.Callback):
        def __init__(self) -> None:
            self.prof: Any = None
            self.seconds = 0.0

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if batch_idx == 2:
                self.prof = torch.profiler.profile(record_shapes=False)
                self.prof.__enter__()
                self.seconds = time.perf_counter()
            if batch_idx == 2 + steps:
                self.seconds = time.perf_counter() - self.seconds
                self.prof.__exit__(None, None, None)
                pl_module.stop = True

    window = Window()
    root = Path(tempfile.mkdtemp(prefix="geomon-profile-"))
    trainer = _trainer([window, callback], root, device)
    loader = torch.utils.data.DataLoader(Windows(tokens, shape.context, shape.batch), batch_size=None)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(model, train_dataloaders=loader)
    finally:
        for cls, method, original in wrapped:
            setattr(cls, method, original)
    events = window.prof.key_averages()
    ranges = sorted((e for e in events if e.key.startswith("geomon:")), key=lambda e: -e.cpu_time_total)
    ops = sorted((e for e in events if not e.key.startswith("geomon:")), key=lambda e: -e.self_cpu_time_total)
    step_ms = window.seconds * 1e3 / steps
    lines = [f"A profiled monitored step took {step_ms:.0f} ms (wall, profiler on). Ranges nest: "
             "`GeomonCallback.on_train_batch_end` holds the probes' `compute`; the probes' `update`s run in the "
             "forward.", "", "| geomon range | calls per step | total ms per step | share of the step |",
             "|---|---|---|---|"]  # fmt: skip
    lines += [f"| {e.key} | {e.count // steps} | {e.cpu_time_total / 1e3 / steps:.1f} | "
              f"{100 * e.cpu_time_total / 1e3 / steps / step_ms:.1f}% |" for e in ranges]  # fmt: skip
    lines += ["", "| op (whole step, model included) | calls per step | self ms per step |", "|---|---|---|"]
    lines += [f"| {e.key} | {e.count // steps} | {e.self_cpu_time_total / 1e3 / steps:.1f} |" for e in ops[:15]]
    return lines


# -- main -----------------------------------------------------------------------------------------------------------
def _without_notes(argv: list[str]) -> list[str]:
    kept, skip = [], False
    for arg in argv:
        if not skip and not arg.startswith("--note"):
            kept.append(arg)
        skip = arg == "--note"
    return kept


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--shape", nargs="+", choices=("gpt2-small", "tiny"), default=["gpt2-small"])
    parser.add_argument("--quick", action="store_true", help="smoke test: a tiny model, a few pairs, a few seconds")
    parser.add_argument("--configs", nargs="+", choices=("default", "every"), default=["default", "every"])
    parser.add_argument("--target", type=float, default=0.004, help="half-width of the 95%% interval to plan for")
    parser.add_argument("--pilot", type=int, default=6, help="timed pairs of the pilot (at least one period)")
    parser.add_argument("--pairs", type=int, help="run exactly this many pairs (warm-up included), no planning")
    parser.add_argument("--warmup-pairs", type=int, default=1)
    parser.add_argument("--max-minutes", type=float, default=12.0, help="cap on one configuration's run")
    parser.add_argument("--clock", choices=tuple(CLOCKS),
                        help="the clock the run plans on and reports step means in (default: cpu on the CPU, wall on "
                        "CUDA, where a step's time is the device's); the table shows the ratio on both")  # fmt: skip
    parser.add_argument("--measure-every", type=int, metavar="N",
                        help="the geomon arm measures every N steps (more measured steps per minute); the ratio is "
                        "still weighted for the configuration's own schedule; configurations that measure more "
                        "often keep theirs")  # fmt: skip
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own; --quick: 1)")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="also profile this many every-probe monitored steps (torch.profiler)")  # fmt: skip
    parser.add_argument("--note", action="append", default=[], help="a line for the results file's notes")
    parser.add_argument("--raw", type=Path, help="also write every timed step (pair, kind, seconds per clock) as JSON")
    parser.add_argument("--out", type=Path, help="markdown results (default: benchmarks/results/...)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.quick:
        args.threads = args.threads or 1
        args.pairs = args.pairs or 16  # one warm-up pair and 15 of 2 x 4 steps: two measured steps at every 50
    if args.pairs is not None and args.pairs <= args.warmup_pairs:
        parser.error("--pairs must exceed --warmup-pairs")
    args.clock = args.clock or ("wall" if args.device == "cuda" else "cpu")
    if args.device == "cuda" and args.clock == "cpu":
        parser.error("--clock cpu: on CUDA a step's time is the device's; use the wall clock")
    if args.measure_every is not None and args.measure_every < 1:
        parser.error("--measure-every must be at least 1")
    if not 0 < args.target < 1:
        parser.error("--target is a fraction, e.g. 0.004 for ±0.4%")
    return args


def run_shape(shape_name: str, args: argparse.Namespace) -> list[str]:
    """Every configuration (and the profile) at one shape: a markdown section."""
    shape = SHAPES[(shape_name, args.device)]
    tokens = zipf_tokens(shape.vocab, 1 << 20, SEED)
    params = sum(p.numel() for p in gpt(shape).parameters())
    model_line = (f"TinyGPT d_model {shape.d_model}, {shape.layers} layers, {shape.heads} heads, seq {shape.context}, "
                  f"batch {shape.batch}, vocab {shape.vocab} (Zipf tokens, head tied to the embedding), "
                  f"{params / 1e6:.1f} M parameters, AdamW"
                  + (", bf16 autocast" if args.device == "cuda" else ", float32"))  # fmt: skip
    load_start, start = loadavg(), time.perf_counter()
    print(f"{shape_name}: {model_line}; threads {torch.get_num_threads()}; load {load_start}", flush=True)
    rows = []
    for key in args.configs:
        name, options = configurations(shape.layers)[key]
        result = run_configuration(options, shape, args.device, tokens, args)
        rows.append(summarise(name, result, args.clock))
        if args.raw:
            raw = json.loads(args.raw.read_text()) if args.raw.exists() else {}
            raw.setdefault(shape_name, {})[key] = {"weights": result["weights"], "periods": result["periods"],
                                                   "steps": result["raw"]}  # fmt: skip
            args.raw.write_text(json.dumps(raw))
        r = rows[-1]
        print(f"{name}: whole-run mean ratio ({CLOCKS[r['clock']]}) {r['ratio']:.4f} "
              f"[{r['ci'][0]:.4f}, {r['ci'][1]:.4f}] "
              f"(half-width {50 * (r['ci'][1] - r['ci'][0]):.2f}%; {r['pairs']} pairs, {r['steps']} steps/arm, "
              f"plain {r['plain_ms']:.1f} ms, measured/plain {r['measured_ratio']:.3f}, max |Δweight| "
              f"{r['delta']:.1e}; {r['planned']})", flush=True)  # fmt: skip
    lines = table(rows)
    print("\n" + "\n".join(lines), flush=True)
    section = [
        f"## {shape_name}: {model_line}",
        "",
        f"- load average (1, 5, 15 min) at start: {load_start}; at end: {loadavg()}; "
        f"{time.perf_counter() - start:.0f} s",
        f"- blocks of {shape.block} steps per arm",
        *(f"- planning ({r['name']}): {r['planned']}" for r in rows),
        "",
        *lines,
    ]
    if args.profile:
        profile_lines = profile(shape, args.device, tokens, every_probe(shape.layers), args.profile)
        print("\n" + "\n".join(profile_lines), flush=True)
        section += ["", f"### Where an every-probe monitored step's time goes (torch.profiler, {args.profile} steps)",
                    "", *profile_lines]  # fmt: skip
    return section


def run(args: argparse.Namespace) -> tuple[list[str], Path]:
    for name in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)  # no banner per Trainer
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else None
    load_start, start = loadavg(), time.perf_counter()
    sections = []
    for shape_name in ["quick"] if args.quick else args.shape:
        sections += ["", *run_shape(shape_name, args)]
    elapsed = time.perf_counter() - start
    machine = f"{cpu_model()}, {os.cpu_count()} cores, torch.get_num_threads() = {torch.get_num_threads()}"
    if gpu:
        machine = f"{gpu} (CUDA {torch.version.cuda}); host {machine}"
    header = [
        f"# geomon overhead through a Lightning Trainer: {gpu or 'CPU'}",
        "",
        f"- machine: {machine}",
        f"- torch {torch.__version__}, lightning {pl.__version__}, Python {platform.python_version()}",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- command: `{shlex.join(['python', 'benchmarks/trainer_overhead.py', *_without_notes(sys.argv[1:])])}`"
        + (" (the `--note` lines are below)" if args.note else ""),
        f"- load average (1, 5, 15 min) at start: {load_start}; at end: {loadavg()}; total run {elapsed:.0f} s",
        "- two Trainers (CSVLogger, no progress bar, no checkpointing), one with GeomonCallback, interleaved in "
        f"blocks (ABBA); {args.warmup_pairs} warm-up pair(s) untimed; a step is timed from on_train_batch_start to "
        "the next, on the wall clock and in process CPU time (all threads; not the time the process waits for the "
        "CPU); whole-run mean ratio = 1 + Σ_kind share_kind · Δ_kind / plain mean, Δ_kind the mean over the pairs "
        "of blocks holding that kind of (its mean - the pair's plain mean), shares (measured, fill, idle steps) from "
        "the configuration's own schedule (`weighted for every`), each kind's steps as timed "
        f"(at `timed at every`); 95% intervals from {BOOTSTRAP} bootstrap resamples of the block pairs; the run "
        f"planned its length on {CLOCKS[args.clock]}",
        "- measured / plain: mean monitored step over mean plain step; max abs Δweight: between the two models at "
        "the end (0 = geomon did not change training)",
        *(f"- note: {note}" for note in args.note),
    ]
    body = [*header, *sections]
    out = write_results(body, "trainer-overhead", out=args.out, quick=args.quick, gpu=gpu)
    print(f"\nwrote {out} ({elapsed:.0f} s)")
    return body, out


def main() -> int:
    run(parse())
    return 0


if __name__ == "__main__":
    sys.exit(main())
