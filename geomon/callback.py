"""``GeomonCallback``: the thin Lightning adapter over :class:`geomon.Monitor`.

One class serves both ``lightning.pytorch`` and ``pytorch_lightning`` Trainers: it derives from the ``Callback``
class of each package that is installed, so either Trainer accepts it and users import it the same way.

Logged keys (scalars, written to every logger of the trainer at the global step whose forward pass was measured,
and put into ``trainer.callback_metrics`` so that ``EarlyStopping(monitor="geomon/...")`` and ``ModelCheckpoint``
see them; ``pl_module.log`` is not used because Lightning would repeat a callback's value on every later step):

- ``geomon/attention/entropy/<module>``: mean entropy (nats) over batch, heads and valid query rows;
- ``geomon/attention/entropy_normalized/<module>``: mean of ``H / log n`` (rows with at least 2 keys);
- ``geomon/attention/max_logit/<module>``: largest attention logit;
- ``geomon/rankme/<probe>``, ``geomon/rankme_cov/<probe>`` (of the centred covariance), ``geomon/alpha_req/<probe>``
  (``D > 100``): when a window of ``4 x D`` rows is full (real tokens only, where ``token_mask_fn`` gives a mask);
  probes: ``<head>.input`` (the features entering the output head), the ``embedding_modules``, and the names of
  tensors returned from ``training_step`` under ``outputs["geomon"]``;
- ``geomon/nc/<stat>/<head>.input``: neural collapse (``nc1``, ``nc2_*``, ``nc3``, ``nc4``, ``cdnv``, ``gnc2_*``,
  ``unc3``, ``nc3_cos_mean``) of the head's input against the head, with labels from ``labels_fn(batch)``;
- ``geomon/spectral/sigma/<module>``, ``geomon/spectral/stable_rank/<module>``: of the ``spectral_modules``;
- ``geomon/spectral/logit_sigma/<module>``: largest σ(W_Q,hᵀ W_K,h)·scale over the heads of each attention layer
  whose projections geomon knows; ``geomon/spectral/entropy_bound/<module>`` with ``entropy_bound=True``;
  ``geomon/spectral/reparam_{gamma,sigma,ratio}/<module>`` for σReparam layers;
- ``geomon/alerts/<rule>``: how many alerts each rule has fired so far (see ``alerts`` and ``on_alert``).

Per-head values and spectra are media, not scalars: ``geomon_heads.csv`` in each logger's directory, heatmap and
spectrum images for W&B and TensorBoard (see :mod:`geomon._media`). A W&B run also gets, with ``media=True``,
min / max summaries of each key, the ``geomon-overview/...`` keys, per-head tables under ``geomon-heads/...`` and
every option under ``geomon`` in its config (see :mod:`geomon.integrations.wandb_dashboard`).

Measurement happens on the first micro-batch of every ``every_n_steps``-th step of the axis Lightning logs its own
metrics on (:func:`logging_step`: optimizer steps under automatic optimization, so gradient accumulation gives one
measurement per optimizer step, computed after it; batches under manual optimization, whatever its optimizers). When
one step has fewer head-input rows than a RankMe / neural-collapse window needs (a classifier), the first
micro-batch of the steps just before each measured step also feeds those windows (hooks on the head's input and
the ``embedding_modules`` only: see :meth:`geomon.Monitor.fills`); other steps do no work. No step syncs the host
with the device except the logging step. Under DDP ``compute`` runs on every rank (it is a collective) and the
values, identical on all ranks, are logged by rank zero.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from typing import Any, Literal

from torch import Tensor

from geomon import _media
from geomon.alerts import CallableSink, CsvSink, Level, LoggingSink, Rule, Sink, WandbSink
from geomon.functional._dispatch import Backend
from geomon.integrations.wandb_dashboard import LIGHTNING_STEP, WandbDashboard, config_value, monitor_settings
from geomon.labels import LabelKind, default_labels, default_token_mask, defaults_for, labels_of, token_mask_of
from geomon.monitor import COMPILED, Monitor, check_flag, checked_labels, checked_token_mask
from geomon.probes.plan import MEMORY_BUDGET_MIB

OnAlert = Literal["warn", "checkpoint", "stop"] | Callable[[Any], None]

#: Key under which ``training_step`` may return ``{name: tensor [..., D]}`` for RankMe / alpha-ReQ.
OUTPUT_KEY = "geomon"


def _callback_bases() -> tuple[type, ...]:
    bases = []
    for module in ("lightning.pytorch", "pytorch_lightning"):
        try:
            bases.append(importlib.import_module(module).Callback)
        except ImportError:
            continue
    if not bases:
        raise ImportError("GeomonCallback needs Lightning: pip install 'geomon[lightning]'")
    return tuple(bases)


def _checkpoint_once_per_step(trainer: Any) -> Callable[[Any], None]:
    """The checkpoint action: one ``geomon-alert-step<step>.ckpt`` per alert step, however many layers fired there
    (every rank gets the same events, so every rank joins the same saves)."""
    saved: set[int] = set()

    def save(event: Any) -> None:
        if event.step not in saved:
            saved.add(event.step)
            trainer.save_checkpoint(f"{trainer.default_root_dir}/geomon-alert-step{event.step}.ckpt")

    return save


def _train_step_context(trainer: Any) -> Any:
    """The context Lightning runs ``training_step`` in (autocast under mixed precision)."""
    plugin = getattr(trainer, "precision_plugin", None)
    context = getattr(plugin, "train_step_context", None)
    return context() if callable(context) else nullcontext()


def logging_step(trainer: Any) -> int:
    """The step Lightning logs the current batch's metrics at, as its own ``LearningRateMonitor`` does: batches
    that stepped the optimizers, counted once per batch however many optimizers a manual optimization steps
    (``trainer.global_step`` counts every optimizer's steps: twice per batch for a GAN). ``global_step`` where the
    loop does not keep it."""
    step = getattr(getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None), "_batches_that_stepped", None)
    return step if isinstance(step, int) else trainer.global_step


class GeomonCallback(*_callback_bases()):  # type: ignore[misc]
    """Watch a LightningModule's geometry during ``fit``.

    Args:
        every_n_steps: measure every this many optimizer steps.
        attention: measure every attention call inside the module (SDPA, Hugging Face, timm, ``nn.MultiheadAttention``).
        head: the output head whose input feeds RankMe and neural collapse (``"auto"``, a module name, ``None``).
        neural_collapse: ``"auto"``, ``True`` or ``False`` (see :class:`geomon.Monitor`).
        labels_fn: ``batch -> labels`` aligned with the head's input rows (default: :func:`default_labels` for the
            kind of the Hugging Face model that owns the head - a causal LM's ``labels`` shifted, a masked LM's,
            token classifier's or seq2seq model's as they are; a warning, once, when the kind is unknown).
        token_mask_fn: ``batch -> token mask [B, N]`` (bool or integer, 1 = a real token, 0 = padding) that leaves
            padding positions out of RankMe / alpha-ReQ of every hooked embedding tensor ``[B, N, D]`` (a tensor of
            another leading shape is measured whole, with one warning per probe); default:
            :func:`geomon.labels.default_token_mask` - a mapping batch's 2-D ``attention_mask`` (a seq2seq model's
            ``decoder_attention_mask``, its head reading decoder rows); ``None``: every position counts.
        embedding_modules: ``fnmatch`` patterns of modules whose outputs feed RankMe / alpha-ReQ.
        spectral_modules: ``fnmatch`` patterns of modules with a 2-D weight (``nn.Embedding`` excluded) whose σ(W)
            and stable rank are logged.
        entropy_bound: also log Theorem 3.1's entropy lower bound per attention layer
            (``geomon/spectral/entropy_bound/<module>``; see :class:`geomon.Monitor`).
        window_rows: rows per RankMe / neural-collapse window (default ``4 x D``).
        query_rows: measure at most this many evenly spaced query rows per head in each attention call; ``"auto"``
            (default): enough to keep the entropy under 2% of the layer's forward FLOPs, at least 128 (see
            :func:`geomon.probes.attention.auto_query_rows`); ``None``: every row.
        media: per-head files, heatmaps and spectra for the loggers that take them; for W&B also the summaries,
            overview keys, per-head tables and config of :mod:`geomon.integrations.wandb_dashboard`.
        alerts: the alert rules (``None``: :func:`geomon.alerts.default_rules`; ``()``: none). Events are logged
            (rank zero), sent to W&B as ``wandb.alert`` when a W&B logger is attached, written to
            ``geomon_alerts.csv`` in each logger's directory, and counted under ``geomon/alerts/<rule>``.
        on_alert: what a fired alert of at least ``action_level`` does besides that: ``"warn"`` (nothing more),
            ``"checkpoint"`` (save ``geomon-alert-step<step>.ckpt`` in the trainer's root directory),
            ``"stop"`` (stop training on every rank at the same step), a callable ``(event) -> None`` (rank zero),
            or a sequence of these.
        action_level: the least severe level that triggers ``on_alert``.
        backend: ``"auto"`` (Triton kernels on CUDA), ``"torch"`` or ``"triton"``.
        memory_budget_mib: the most memory all probe state together may take (MiB, per process; see
            :class:`geomon.Monitor`): a plan over it fails at attach, naming its largest probes.
        measure_forward: ``(pl_module, batch) -> anything``: measure by an extra forward pass that this function
            runs, not by the training forward - for a ``torch.compile``'d model (or submodule), whose own forward
            hooks cannot see into (without it, such a model is refused at ``on_fit_start`` unless the hook-based
            probes are off). Called at the start of each measured (and fill) step's first micro-batch, on its
            batch, under the Trainer's precision context, without gradients, with compiled code run eagerly and the
            random-number state and buffers restored after it (:meth:`geomon.Monitor.measure_forward`): training is
            unchanged, and each measured (or fill) step costs one more forward pass (none when only weight-based
            probes are on: ``attention=False, head=None`` and no ``embedding_modules``). Example:
            ``measure_forward=lambda module, batch: module(batch[0])``.
        strict: raise probe errors instead of warning (for tests).

    Example:
        >>> callback = GeomonCallback(every_n_steps=100, query_rows=256)
        >>> callback.monitor.every_n_steps
        100
    """

    def __init__(
        self,
        *,
        every_n_steps: int = 50,
        attention: bool = True,
        head: str | None = "auto",
        neural_collapse: bool | Literal["auto"] = "auto",
        labels_fn: Callable[[Any], Tensor | None] = default_labels,
        token_mask_fn: Callable[[Any], Tensor | None] | None = default_token_mask,
        embedding_modules: Sequence[str] = (),
        spectral_modules: Sequence[str] = (),
        entropy_bound: bool = False,
        window_rows: int | None = None,
        query_rows: int | Literal["auto"] | None = "auto",
        media: bool = True,
        alerts: Sequence[Rule] | None = None,
        on_alert: OnAlert | Sequence[OnAlert] = "warn",
        action_level: Level = "WARN",
        backend: Backend = "auto",
        memory_budget_mib: float = MEMORY_BUDGET_MIB,
        measure_forward: Callable[[Any, Any], Any] | None = None,
        strict: bool = False,
    ) -> None:
        if measure_forward is not None and not callable(measure_forward):
            raise TypeError(f"measure_forward must be a callable (pl_module, batch) -> anything, or None, got "
                            f"{measure_forward!r}")  # fmt: skip
        self.measure_forward = measure_forward
        if on_alert is None or not (isinstance(on_alert, str) or callable(on_alert) or isinstance(on_alert, Sequence)):
            raise TypeError(f"on_alert must be 'warn', 'checkpoint', 'stop', a callable or a list of these, got "
                            f"{on_alert!r}")  # fmt: skip
        check_flag(media, "media")
        actions = [on_alert] if isinstance(on_alert, str) or callable(on_alert) else list(on_alert)
        for action in actions:
            if not callable(action) and action not in ("warn", "checkpoint", "stop"):
                raise ValueError(f"on_alert must be 'warn', 'checkpoint', 'stop' or a callable, got {action!r}")
        if action_level not in ("INFO", "WARN", "ERROR"):
            raise ValueError(f"action_level must be 'INFO', 'WARN' or 'ERROR', got {action_level!r}")
        self.actions, self.action_level = actions, action_level
        if not callable(labels_fn):
            raise TypeError(f"labels_fn must be callable (batch -> labels), got {labels_fn!r}")
        if token_mask_fn is not None and not callable(token_mask_fn):
            raise TypeError(f"token_mask_fn must be callable (batch -> token mask [B, N]) or None, got "
                            f"{token_mask_fn!r}")  # fmt: skip
        self.monitor = Monitor(
            every_n_steps=every_n_steps,
            attention=attention,
            head=head,
            neural_collapse=neural_collapse,
            embedding_modules=embedding_modules,
            spectral_modules=spectral_modules,
            entropy_bound=entropy_bound,
            window_rows=window_rows,
            query_rows=query_rows,
            alerts=alerts,
            backend=backend,
            memory_budget_mib=memory_budget_mib,
            strict=strict,
        )
        self.labels_fn, self.token_mask_fn, self.media, self.strict = labels_fn, token_mask_fn, media, strict
        #: the kind of the model owning the head (default labels_fn and token_mask_fn)
        self.label_kind: LabelKind | None = None
        self._armed: Any = None
        self._measured_step = 0
        self._optimizer_steps = 0  # trainer.global_step when the measured step began
        self._to_compute = False
        self._observed = False  # the measured micro-batch's outputs were handed to observe
        self._pending_state: dict[str, Any] | None = None
        self._dashboards: list[WandbDashboard] = []

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        # here, not in setup: the model exists (configure_model has run) and sits on its device, wrapped as the
        # strategy wraps it (FSDP), so the plan reads the structure that will train
        self.monitor.attach(pl_module)
        if self.monitor.compiled and self.measure_forward is None:
            raise ValueError(COMPILED.format(parts=self.monitor.compiled))
        self.label_kind = defaults_for(self.monitor, pl_module, self.labels_fn, self.token_mask_fn)
        self.monitor.alert_engine.sinks = self._sinks(trainer)
        if self._pending_state is not None:
            self.monitor.load_state_dict(self._pending_state)
            self._pending_state = None
        self._dashboards = []
        if self.media and trainer.is_global_zero:
            self.monitor.guard.run("the W&B dashboard", self._setup_dashboards, trainer.loggers)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        # here, once a resumed fit has its step back: the steps from there run again, and so do their sidecar rows
        # (a fresh fit into a directory that holds earlier rows, a second stage, keeps them)
        if getattr(trainer, "ckpt_path", None) is None:
            return
        for directory in _media.logger_directories(trainer.loggers if trainer.is_global_zero else []):
            for name in (_media.ALERTS_FILE, _media.HEADS_FILE):
                self.monitor.guard.run(f"the sidecar {name}", _media.forget_from, f"{directory}/{name}",
                                       logging_step(trainer))  # fmt: skip

    def _setup_dashboards(self, loggers: list[Any]) -> None:
        settings = {**monitor_settings(self.monitor), "media": self.media, "on_alert": config_value(self.actions),
                    "action_level": self.action_level, "labels_fn": config_value(self.labels_fn),
                    "token_mask_fn": config_value(self.token_mask_fn), "label_kind": self.label_kind,
                    "measure_forward": config_value(self.measure_forward)}  # fmt: skip
        for logger in loggers:
            if _media.logger_kind(logger) == "WandbLogger":
                prefix = getattr(logger, "_prefix", "") or ""  # WandbLogger(prefix="p") logs p-<key>
                joined = prefix + getattr(logger, "LOGGER_JOIN_CHAR", "-") if prefix else ""
                dashboard = WandbDashboard(logger.experiment, step_metric=LIGHTNING_STEP, head=self.monitor.head,
                                           prefix=joined)  # fmt: skip
                dashboard.setup(settings, [] if self.monitor.plan is None else self.monitor.plan.keys())
                self._dashboards.append(dashboard)

    def _sinks(self, trainer: Any) -> list[Sink]:
        sinks: list[Sink] = [LoggingSink()]
        loggers = trainer.loggers if trainer.is_global_zero else []
        for logger in loggers:
            if _media.logger_kind(logger) == "WandbLogger":
                sinks.append(WandbSink(logger.experiment))
        for directory in _media.logger_directories(loggers):  # one file per directory, however many loggers share it
            sinks.append(CsvSink(f"{directory}/{_media.ALERTS_FILE}"))
        act = {"kinds": ("fired",), "min_level": self.action_level}
        for action in self.actions:
            if action == "stop":
                sinks.append(CallableSink(lambda event: setattr(trainer, "should_stop", True), **act))
            elif action == "checkpoint":
                sinks.append(CallableSink(_checkpoint_once_per_step(trainer), **act))
            elif callable(action):
                sinks.append(CallableSink(action, all_ranks=False, **act))
        return sinks

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        first_micro_batch = batch_idx % max(1, trainer.accumulate_grad_batches) == 0
        if self.monitor.model is None or not first_micro_batch:
            return
        if self._to_compute:  # the measured step's optimizer step has not come yet
            return
        step = logging_step(trainer)
        scheduled = self.monitor.is_scheduled(step)
        if scheduled or self.monitor.fills(step):  # a fill step arms the windowed probes' hooks only, no compute
            labels = None
            if self.monitor.collapse is not None:
                labels = self.monitor.guard.run("labels_fn", self._labels, batch)
            mask = self.monitor.guard.run("token_mask_fn", self._token_mask, batch)
            if self.measure_forward is not None and self.monitor.reads_forward:
                # before the training forward: the weights it uses, its batch (weight-based probes alone read no
                # forward: they take the plain path below, which hooks nothing for them)
                with _train_step_context(trainer):
                    self.monitor.measure_forward(step, self.measure_forward, pl_module, batch, labels=labels,
                                                 token_mask=mask)  # fmt: skip
            else:
                armed = self.monitor.step(step, labels=labels, token_mask=mask)
                if self.monitor.guard.run("arming the capture", armed.__enter__, default=False) is not False:
                    self._armed = armed
        if scheduled:
            self._measured_step, self._to_compute, self._observed = step, True, False
            self._optimizer_steps = trainer.global_step

    def _labels(self, batch: Any) -> Tensor | None:
        return checked_labels(labels_of(batch, self.labels_fn, self.label_kind, self.monitor.guard, self.monitor.head))

    def _token_mask(self, batch: Any) -> Tensor | None:
        return checked_token_mask(token_mask_of(batch, self.token_mask_fn, self.label_kind))

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._disarm()
        if not self._to_compute:  # set on every rank alike: compute is a collective
            return
        if not self._observed:  # the measured (first) micro-batch's returned tensors
            self._observed = True
            if isinstance(outputs, Mapping) and isinstance(outputs.get(OUTPUT_KEY), Mapping):
                for name, tensor in outputs[OUTPUT_KEY].items():
                    self.monitor.guard.run(f"outputs[{OUTPUT_KEY!r}][{name!r}]", self.monitor.observe, str(name),
                                           tensor)  # fmt: skip
        # Compute once the measured step's optimizer step has run (the last micro-batch under gradient
        # accumulation), so that an alert's stop or checkpoint acts between optimizer steps, never inside one. Under
        # manual optimization a batch is a step (Lightning logs per batch), whatever its optimizer calls.
        if trainer.global_step > self._optimizer_steps or not getattr(pl_module, "automatic_optimization", True):
            self._compute(trainer)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._disarm()  # a batch whose end never came (the module's on_train_batch_start returned -1)
        if self._to_compute:  # an epoch that ended without the measured step's optimizer step
            self._compute(trainer)

    def _compute(self, trainer: Any) -> None:
        self._to_compute = False
        values = self.monitor.compute(self._measured_step, spectra=self.media)
        trainer.callback_metrics.update({key: value.float() for key, value in values.items()})
        if values:
            # the loggers get the values as computed (float64), not their float32 copies in callback_metrics: CSV,
            # W&B and MLflow keep doubles; the logging step: a sync is fine here
            scalars = {key: float(value) for key, value in values.items()}
            for dashboard in self._dashboards:  # before logging: a summary counts only values logged after it
                self.monitor.guard.run("the W&B dashboard", dashboard.define, scalars)
            for logger in trainer.loggers:
                logger.log_metrics(scalars, step=self._measured_step)
            for dashboard in self._dashboards:
                self.monitor.guard.run("the W&B dashboard", dashboard.log, self._measured_step, scalars,
                                       self.monitor.details)  # fmt: skip
        monitor = self.monitor
        if self.media and trainer.is_global_zero and (monitor.details or monitor.spectra):
            self.monitor.guard.run("media", _media.log_media, trainer.loggers, self._measured_step, monitor.details,
                          monitor.spectra)  # fmt: skip

    def _disarm(self, error: BaseException | None = None) -> None:
        armed, self._armed = self._armed, None
        if armed is None:
            return
        if error is None:
            armed.__exit__(None, None, None)
        else:  # the capture hears that its forward did not finish
            armed.__exit__(type(error), error, error.__traceback__)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._to_compute = False
        self._disarm(exception)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._disarm()
        self.monitor.detach()

    @property
    def state_key(self) -> str:
        """The key of this callback's state in a checkpoint: distinct for callbacks that watch different things, so
        that one Trainer can hold several (say, attention every 10 steps and embeddings every 500). The period is not
        part of it: a fit resumed with another ``every_n_steps`` restores the same windows and alert state."""
        options = self.monitor.options
        return self._generate_state_key(  # type: ignore[no-any-return]
            attention=options.attention, head=options.head,
            neural_collapse=options.neural_collapse, embedding_modules=list(options.embedding_modules),
            spectral_modules=list(options.spectral_modules), entropy_bound=options.entropy_bound,
        )  # fmt: skip

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """A checkpoint without this callback's key (saved by an older geomon under the class name, or by a
        callback that watched other things) restores the one GeomonCallback state it holds, rather than none:
        Lightning would drop it in silence. Probes not in this plan are named and left out."""
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states:
            return
        ours = type(self).__qualname__
        peers = [cb for cb in getattr(trainer, "callbacks", []) if isinstance(cb, GeomonCallback)]
        claimed = {cb.state_key for cb in peers}  # states another callback of this Trainer restores by its own key
        mine = [key for key in states if isinstance(key, str) and key.split("{", 1)[0] == ours and key not in claimed]
        unmatched = [cb for cb in peers if cb.state_key not in states]
        if len(mine) != 1 or len(unmatched) > 1:
            if mine:
                self.monitor.guard.warn_once("restore", f"geomon: the checkpoint's GeomonCallback states {mine} and "
                                             f"this Trainer's callbacks without a state of their own cannot be "
                                             f"paired; {self.state_key} starts fresh")  # fmt: skip
            return
        if mine[0] != type(self).__qualname__:
            self.monitor.guard.warn_once("restore", f"geomon: restoring the state of a callback that watched other "
                                         f"things ({mine[0]}, this one is {self.state_key})")  # fmt: skip
        self.load_state_dict(copy.deepcopy(states[mine[0]]))

    def state_dict(self) -> dict[str, Any]:
        return self.monitor.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.monitor.model is not None:  # Lightning restores callbacks after setup when it resumes a fit
            self.monitor.load_state_dict(state_dict)
        else:
            self._pending_state = state_dict  # applied at on_fit_start, once the module is attached
