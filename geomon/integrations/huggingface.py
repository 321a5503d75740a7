"""``GeomonTrainerCallback``: the Hugging Face ``Trainer`` adapter over :class:`geomon.Monitor`.

``Trainer(..., callbacks=[GeomonTrainerCallback()])``. At ``on_train_begin`` the monitor attaches to the model the
Trainer trains (DDP / ``DataParallel`` wrappers unwrapped, so keys carry the model's own module paths); the forward
pass of the first micro-batch of every ``every_n_steps``-th optimizer step is measured, and the values are logged
at the step that optimizer step completes (the Trainer's numbering, as its loss: ``state.global_step`` after the
update), under the same keys as :class:`geomon.GeomonCallback` (``geomon/attention/entropy/transformer.h.0.attn``,
``geomon/rankme/lm_head.input``, ``geomon/nc/nc1/lm_head.input``, ``geomon/alerts/<rule>``, ...).

Where the values go: through ``transformers.Trainer.log`` (the base method: a subclass's override, such as TRL's
that adds its buffered metrics to the row, is not called), the path the Trainer's own loss takes, so they are in
``trainer.state.log_history`` and reach every ``report_to`` integration's ``on_log``. transformers' integrations
(W&B, TensorBoard, Comet, Neptune, Trackio, SwanLab) prefix every training key with ``train/``
(``transformers.integrations.integration_utils.rewrite_logs``); while geomon logs its own values, that function
passes keys that start with ``geomon/`` through unchanged (every other key is rewritten as before), so the keys
arrive as they are. The callback finds the ``Trainer`` that calls it (a callback's hooks are not given it) by
looking up the call stack once, at ``on_train_begin``, for the ``Trainer`` whose callbacks hold it.

The batch: a forward pre-hook on the model, registered at ``on_step_begin`` of a measured step and removed by its first
call with gradients enabled (a generation or reference pass under ``no_grad`` before it is not measured), sees the
measured micro-batch's inputs (``model(**inputs)``: ``input_ids``, ``labels``, ...); there it turns them into labels for
neural collapse (``labels_fn``; by default a causal LM's ``labels`` shifted as the model shifts them, other kinds' as
they are, see :mod:`geomon.labels`) and a token mask that leaves padding out of RankMe / alpha-ReQ (``token_mask_fn``;
by default the call's ``attention_mask``, a seq2seq model's ``decoder_attention_mask``), and arms the capture. The
capture is disarmed after that micro-batch (``on_substep_end``, or ``on_step_end`` without gradient accumulation),
and ``Monitor.compute`` runs at ``on_step_end`` on every rank (a collective under DDP); every rank logs like the
Trainer does (its integrations write on the world's process zero only).

A compiled model (``TrainingArguments(torch_compile=True)``, or a model or submodule compiled before the Trainer got
it) runs no hooks inside its graph, and patching the attention call while its graph runs would make it recompile.
There the measured micro-batch is measured by an extra forward pass instead (:meth:`geomon.Monitor.measure_forward`):
the Trainer's ``compute_loss`` is wrapped for that one call, and before the training forward the wrapper runs
``model(**inputs)`` on the inputs ``training_step`` handed it: prepared once, as training prepares them (a subclass's
``_prepare_inputs`` may have side effects: TRL's GRPO generates there and advances its buffer), with the model in
training mode (``training_step`` calls ``model.train()``, which an evaluation before the step undid), inside the
Trainer's ``compute_loss_context_manager``, without gradients and eagerly; the compiled graph is neither changed nor
recompiled.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor, nn

from geomon import _media
from geomon._media import ALERTS_FILE
from geomon.alerts import CallableSink, CsvSink, Level, LoggingSink, Rule, Sink, WandbSink
from geomon.capture.modules import compiled_parts
from geomon.functional._dispatch import Backend
from geomon.integrations.wandb_dashboard import WandbDashboard, config_value, monitor_settings
from geomon.keys import is_geomon
from geomon.labels import LabelKind, default_labels, default_token_mask, defaults_for, labels_of, token_mask_of
from geomon.monitor import Monitor, checked_token_mask
from geomon.probes.plan import MEMORY_BUDGET_MIB

try:
    from transformers import Trainer, TrainerCallback
except ImportError as error:  # pragma: no cover - transformers is what this module adapts to
    raise ImportError("geomon.integrations.huggingface needs transformers: pip install transformers") from error

OnAlert = Literal["warn", "checkpoint", "stop"] | Callable[[Any], None]

#: The monitor's state in each Trainer checkpoint (``geomon_state_<rank>.pt`` when there are several processes).
STATE_FILE = "geomon_state.pt"


#: the step metric transformers' W&B integration logs with every row
HF_STEP = "train/global_step"


def _call(model: nn.Module, inputs: Any) -> Any:
    """The model on a Trainer's inputs, as ``compute_loss`` calls it."""
    return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)


def trainer_log(trainer: Any) -> Callable[[dict[str, float]], None] | None:
    """``transformers.Trainer.log`` bound to ``trainer``, past any subclass's override: TRL's trainers (SFT, DPO,
    GRPO, KTO) override ``log`` to add the metrics they buffered since their last row and then empty the buffer,
    so a row of geomon's logged through the override would take those metrics from the Trainer's own next row."""
    if isinstance(trainer, Trainer):
        return functools.partial(Trainer.log, trainer)
    log = getattr(trainer, "log", None)
    return log if callable(log) else None


def state_file(rank: int, world_size: int) -> str:
    """The name of the monitor's state file of process ``rank`` in a checkpoint directory."""
    return STATE_FILE if world_size <= 1 else f"geomon_state_{rank}.pt"


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / ``DataParallel`` wrappers (the one whose module paths name the keys)."""
    wrappers = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    while isinstance(model, wrappers):
        model = model.module
    return model


@contextmanager
def geomon_keys_unprefixed() -> Iterator[None]:
    """While open, transformers' integrations log keys starting with ``geomon/`` as they are (no ``train/``)."""
    try:
        from transformers.integrations import integration_utils
    except Exception:  # pragma: no cover - an unusual transformers build: keys get the integrations' prefix
        yield
        return
    original = getattr(integration_utils, "rewrite_logs", None)
    if not callable(original):  # pragma: no cover - a transformers that no longer rewrites
        yield
        return

    def rewrite_logs(logs: dict[str, Any]) -> dict[str, Any]:
        rewritten = original({key: value for key, value in logs.items() if not is_geomon(key)})
        rewritten.update({key: value for key, value in logs.items() if is_geomon(key)})
        return rewritten

    integration_utils.rewrite_logs = rewrite_logs
    try:
        yield
    finally:
        integration_utils.rewrite_logs = original


class GeomonTrainerCallback(TrainerCallback):
    """Watch a model's geometry while a Hugging Face ``Trainer`` trains it.

    Args:
        every_n_steps: measure every this many optimizer steps (``None``: the Trainer's ``logging_steps``); the
            first micro-batch of the optimizer step that completes step ``s`` is measured when
            ``s % every_n_steps == 0``, and its values are logged at step ``s``.
        attention: measure every attention call inside the model (transformers' attention interface, SDPA, ...).
        head: the output head whose input feeds RankMe and neural collapse (``"auto"``, a module name, ``None``).
        neural_collapse: ``"auto"``, ``True`` or ``False`` (see :class:`geomon.Monitor`).
        labels_fn: ``batch -> labels`` aligned with the head's input rows, where ``batch`` is the keyword
            arguments of the measured forward call (``model(**inputs)``); default: :func:`geomon.labels.default_labels`
            for the kind of the model that owns the head.
        token_mask_fn: ``batch -> token mask [B, N]`` (bool or integer, 1 = a real token, 0 = padding) of the
            measured forward call's keyword arguments, which leaves padding positions out of RankMe / alpha-ReQ of
            every hooked embedding tensor ``[B, N, D]`` (a tensor of another leading shape is measured whole, with
            one warning per probe); default: :func:`geomon.labels.default_token_mask` - the call's 2-D
            ``attention_mask`` (``DataCollatorWithPadding``'s; a seq2seq model's ``decoder_attention_mask``);
            ``None``: every position counts.
        embedding_modules: ``fnmatch`` patterns of modules whose outputs feed RankMe / alpha-ReQ.
        spectral_modules: ``fnmatch`` patterns of modules with a 2-D weight (``nn.Embedding`` excluded) whose σ(W)
            and stable rank are logged.
        entropy_bound: also log Theorem 3.1's entropy lower bound per attention layer.
        window_rows: rows per RankMe / neural-collapse window (default ``4 x D``).
        query_rows: measure at most this many evenly spaced query rows per head in each attention call; ``"auto"``
            (default): enough to keep the entropy under 2% of the layer's forward FLOPs, at least 128 (see
            :func:`geomon.probes.attention.auto_query_rows`); ``None``: every row.
        alerts: the alert rules (``None``: :func:`geomon.alerts.default_rules`; ``()``: none). Events are logged
            (process zero), sent as ``wandb.alert`` when a W&B run is active (``report_to`` W&B), written to
            ``geomon_alerts.csv`` in the output directory, and counted under ``geomon/alerts/<rule>``.
        on_alert: what a fired alert of at least ``action_level`` does besides that: ``"warn"`` (nothing more),
            ``"checkpoint"`` (``control.should_save``: the Trainer saves a checkpoint at that step), ``"stop"``
            (``control.should_training_stop`` on every rank at the same step), a callable ``(event) -> None``
            (process zero), or a sequence of these.
        action_level: the least severe level that triggers ``on_alert``.
        backend: ``"auto"`` (Triton kernels on CUDA), ``"torch"`` or ``"triton"``.
        memory_budget_mib: the most memory all probe state together may take (MiB, per process; see
            :class:`geomon.Monitor`): a plan over it fails at attach, naming its largest probes.
        strict: raise probe errors instead of warning (for tests).

    Example:
        >>> callback = GeomonTrainerCallback(every_n_steps=100, on_alert="stop")
        >>> callback.monitor.every_n_steps
        100
    """

    def __init__(
        self,
        *,
        every_n_steps: int | None = None,
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
        alerts: Sequence[Rule] | None = None,
        on_alert: OnAlert | Sequence[OnAlert] = "warn",
        action_level: Level = "WARN",
        backend: Backend = "auto",
        memory_budget_mib: float = MEMORY_BUDGET_MIB,
        strict: bool = False,
    ) -> None:
        actions = [on_alert] if isinstance(on_alert, str) or callable(on_alert) else list(on_alert)
        for action in actions:
            if not callable(action) and action not in ("warn", "checkpoint", "stop"):
                raise ValueError(f"on_alert must be 'warn', 'checkpoint', 'stop' or a callable, got {action!r}")
        if action_level not in ("INFO", "WARN", "ERROR"):
            raise ValueError(f"action_level must be 'INFO', 'WARN' or 'ERROR', got {action_level!r}")
        if not callable(labels_fn):
            raise TypeError(f"labels_fn must be callable (batch -> labels), got {labels_fn!r}")
        if token_mask_fn is not None and not callable(token_mask_fn):
            raise TypeError(f"token_mask_fn must be callable (batch -> token mask [B, N]) or None, got "
                            f"{token_mask_fn!r}")  # fmt: skip
        self.monitor = Monitor(
            every_n_steps=50 if every_n_steps is None else every_n_steps,
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
        self.every_n_steps, self.actions, self.action_level = every_n_steps, actions, action_level
        self.labels_fn, self.token_mask_fn, self.strict = labels_fn, token_mask_fn, strict
        #: the kind of the model owning the head (default labels_fn and token_mask_fn)
        self.label_kind: LabelKind | None = None
        self.trainer: Any = None  #: the Trainer running this callback, between train begin and end
        self._control: Any = None
        self._hook: Any = None  # the forward pre-hook waiting for the measured micro-batch
        self._armed: Any = None
        self._measured_step = 0
        self._armed_step = 0  # the step the pending hook arms: measured, or one that fills the windows
        self._compiled = False  # the Trainer runs a compiled model: measure by an extra forward (see the module)
        self._wrapped: tuple[Any, Any] | None = None  # (trainer, its own compute_loss attribute or None) while wrapped
        self._to_compute = False
        self._pending_state: dict[str, Any] | None = None
        self._dashboard: WandbDashboard | None = None  # the W&B run's summaries, overview and per-head tables

    # setup -----------------------------------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any):
        self._release()
        self.trainer, resume = self._find_trainer()
        if model is None:
            model = getattr(self.trainer, "model", None)
        if model is None:
            raise ValueError("GeomonTrainerCallback: the Trainer passed no model to on_train_begin")
        if self.every_n_steps is None:
            self.monitor.every_n_steps = max(1, int(getattr(state, "logging_steps", 0) or args.logging_steps or 50))
        # compiled by the Trainer, or before it (read before unwrapping: a compiled wrapper is unwrapped); an extra
        # forward only where a probe reads the forward: weight-based probes need none
        compiled = bool(getattr(args, "torch_compile", False) or compiled_parts(model))
        model = unwrap(model)
        self.monitor.attach(model)
        self._compiled = compiled and self.monitor.reads_forward
        if self._compiled and self.trainer is None:
            raise ValueError("geomon: the model is compiled, so GeomonTrainerCallback measures it by an extra forward "
                             "pass run from the Trainer's compute_loss, and no transformers Trainer was found calling "
                             "this callback")  # fmt: skip
        self.label_kind = defaults_for(self.monitor, model, self.labels_fn, self.token_mask_fn)
        if state.is_world_process_zero and args.output_dir and state.global_step > 0:  # resumed: the steps after
            # the checkpoint run again, and so do their rows (a fresh run in the same output_dir keeps the old ones)
            self.monitor.guard.run("the alerts file", _media.forget_from,
                                   os.path.join(args.output_dir, ALERTS_FILE), state.global_step + 1)  # fmt: skip
        self.monitor.alert_engine.sinks = self._sinks(args, state)
        self._dashboard = None
        if state.is_world_process_zero:
            self.monitor.guard.run("the W&B dashboard", self._setup_dashboard)
        if self._pending_state is None and state.global_step > 0:
            self._pending_state = self._saved_state(args, state, resume)
        if self._pending_state is not None:
            self.monitor.load_state_dict(self._pending_state)
            self._pending_state = None

    def _find_trainer(self) -> tuple[Any, Any]:
        """The ``Trainer`` whose callback handler holds this callback, and the checkpoint it resumes from, read
        from the stack (the Trainer's training loop called this hook through its handler)."""
        frame = sys._getframe(1)
        for _ in range(16):
            if frame is None:
                break
            candidate = frame.f_locals.get("self")
            callbacks = getattr(getattr(candidate, "callback_handler", None), "callbacks", ())
            if callable(getattr(candidate, "log", None)) and any(cb is self for cb in callbacks):
                return candidate, frame.f_locals.get("resume_from_checkpoint")
            frame = frame.f_back
        self.monitor.guard.warn_once(
            "no-trainer",
            "geomon: GeomonTrainerCallback was not called by a transformers Trainer's training loop; its values go "
            "to state.log_history only (no report_to integration gets them)",
        )
        return None, None

    def _reported_run(self) -> Any:
        """The W&B run the Trainer reports to (its ``WandbCallback`` started it), else ``None``: a run the user
        opened beside a Trainer that does not report there gets neither the dashboard nor the alerts, as it gets
        none of the values."""
        callbacks = getattr(getattr(self.trainer, "callback_handler", None), "callbacks", ())
        if not any(c.__name__ == "WandbCallback" for callback in callbacks for c in type(callback).__mro__):
            return None
        return getattr(sys.modules.get("wandb"), "run", None)

    def _setup_dashboard(self) -> None:
        run = self._reported_run()
        if run is None:
            return
        settings = {**monitor_settings(self.monitor), "on_alert": config_value(self.actions),
                    "action_level": self.action_level, "labels_fn": config_value(self.labels_fn),
                    "token_mask_fn": config_value(self.token_mask_fn), "label_kind": self.label_kind}  # fmt: skip
        self._dashboard = WandbDashboard(run, step_metric=HF_STEP, head=self.monitor.head)
        self._dashboard.setup(settings, [] if self.monitor.plan is None else self.monitor.plan.keys())

    def _sinks(self, args: Any, state: Any) -> list[Sink]:
        sinks: list[Sink] = [LoggingSink()]
        if state.is_world_process_zero:
            run = self._reported_run()
            if run is not None:
                sinks.append(WandbSink(run))
            if args.output_dir:
                sinks.append(CsvSink(os.path.join(args.output_dir, ALERTS_FILE)))
        act = {"kinds": ("fired",), "min_level": self.action_level}
        for action in self.actions:
            if action == "stop":
                sinks.append(CallableSink(lambda event: self._set_control("should_training_stop"), **act))
            elif action == "checkpoint":
                sinks.append(CallableSink(lambda event: self._set_control("should_save"), **act))
            elif callable(action):
                sinks.append(CallableSink(action, all_ranks=False, **act))
        return sinks

    def _set_control(self, flag: str) -> None:
        if self._control is not None:
            setattr(self._control, flag, True)

    # capture ---------------------------------------------------------------------------------------------------
    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # called on the first micro-batch of each optimizer step; it completes step global_step + 1
        model = self.monitor.model
        step = state.global_step + 1
        if model is None:
            return
        scheduled = self.monitor.is_scheduled(step)
        if not scheduled and not self.monitor.fills(step):  # a fill step arms the windowed probes' hooks only
            return
        if scheduled:
            self._measured_step, self._to_compute = step, True  # on every rank alike: compute is a collective
        self._armed_step = step
        self._release()  # nothing is armed at a step's start, unless a measured forward raised before
        if self._compiled:
            self._wrap_compute_loss()
        else:
            self._hook = model.register_forward_pre_hook(self._arm, with_kwargs=True)

    def _wrap_compute_loss(self) -> None:
        """Have the Trainer's next ``compute_loss`` call measure its inputs by an extra forward first: there the
        inputs are prepared (once, as training prepares them), the model is in training mode and the Trainer's
        autocast is on."""
        trainer = self.trainer
        own = trainer.__dict__.get("compute_loss")  # an attribute set on the instance, else the class's method
        original = trainer.compute_loss

        def compute_loss(model: nn.Module, inputs: Any, *args: Any, **kwargs: Any) -> Any:
            if not (model.training and torch.is_grad_enabled()):  # an evaluation's call (a step that raised left
                return original(model, inputs, *args, **kwargs)  # the wrapper): the training's call measures
            self._unwrap_compute_loss()
            self.monitor.guard.run("the extra measuring forward", self._measure, inputs)
            return original(model, inputs, *args, **kwargs)

        trainer.compute_loss = compute_loss
        self._wrapped = (trainer, own)

    def _unwrap_compute_loss(self) -> None:
        wrapped, self._wrapped = self._wrapped, None
        if wrapped is None:
            return
        trainer, own = wrapped
        if own is None:
            trainer.__dict__.pop("compute_loss", None)
        else:
            trainer.compute_loss = own

    def _measure(self, inputs: Any) -> None:
        labels = None
        if self.monitor.collapse is not None:
            labels = self.monitor.guard.run("labels_fn", self._labels, inputs)
        mask = self.monitor.guard.run("token_mask_fn", self._token_mask, inputs)
        self.monitor.measure_forward(self._armed_step, _call, self.monitor.model, inputs, labels=labels,
                                     token_mask=mask)  # fmt: skip

    def _arm(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not torch.is_grad_enabled():  # generation or a reference pass before the trained forward (GRPO, DPO)
            return
        self._remove_hook()
        labels = None
        if self.monitor.collapse is not None:
            labels = self.monitor.guard.run("labels_fn", self._labels, kwargs if kwargs else args)
        mask = self.monitor.guard.run("token_mask_fn", self._token_mask, kwargs if kwargs else args)
        armed = self.monitor.step(self._armed_step, labels=labels, token_mask=mask)
        if self.monitor.guard.run("arming the capture", armed.__enter__, default=False) is not False:
            self._armed = armed

    def _labels(self, batch: Any) -> Tensor | None:
        return labels_of(batch, self.labels_fn, self.label_kind, self.monitor.guard, self.monitor.head)

    def _token_mask(self, batch: Any) -> Tensor | None:
        return checked_token_mask(token_mask_of(batch, self.token_mask_fn, self.label_kind))

    def on_substep_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._release()  # only the first micro-batch of an accumulated step is measured

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._release()
        if not self._to_compute:
            return
        self._to_compute, self._control = False, control
        values = self.monitor.compute(self._measured_step)
        if values:
            self._log(state, {key: float(value) for key, value in values.items()})  # the logging step: sync is fine

    def _log(self, state: Any, values: dict[str, float]) -> None:
        log = trainer_log(self.trainer)
        if log is None:
            state.log_history.append({**values, "step": state.global_step})
            return
        control = getattr(self.trainer, "control", None)
        should_log = getattr(control, "should_log", False)
        dashboard = self._dashboard
        if dashboard is not None:  # before logging: a W&B summary counts only the values logged after it
            self.monitor.guard.run("the W&B dashboard", dashboard.define, values)
        with geomon_keys_unprefixed():
            log(values)
        if control is not None:  # the handler's on_log cleared it: the Trainer's own log of this step still runs
            control.should_log = should_log
        if dashboard is not None:
            self.monitor.guard.run("the W&B dashboard", dashboard.log, state.global_step, values, self.monitor.details)

    def _remove_hook(self) -> None:
        self._unwrap_compute_loss()
        hook, self._hook = self._hook, None
        if hook is not None:
            hook.remove()

    def _release(self) -> None:
        """Remove the waiting pre-hook and disarm the capture."""
        self._remove_hook()
        armed, self._armed = self._armed, None
        if armed is not None:
            armed.__exit__(None, None, None)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._release()
        self._to_compute = False
        self.monitor.detach()
        self.trainer = self._control = None

    # checkpoints -----------------------------------------------------------------------------------------------
    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        directory = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if self.monitor.plan is None:
            return
        if not os.path.isdir(directory):
            self.monitor.guard.warn_once("no-checkpoint-dir", f"geomon: no checkpoint directory {directory}; the "
                                         "monitor's state is not saved with it")  # fmt: skip
            return
        path = os.path.join(directory, state_file(args.process_index, args.world_size))
        self.monitor.guard.run("saving the monitor's state", torch.save, self.monitor.state_dict(), path)

    def _saved_state(self, args: Any, state: Any, resume: Any) -> dict[str, Any] | None:
        """The monitor's state saved in the checkpoint this run resumes from, if any."""
        directories = [resume] if isinstance(resume, (str, os.PathLike)) else []
        directories.append(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
        name = state_file(args.process_index, args.world_size)
        for directory in directories:
            path = os.path.join(directory, name)
            if os.path.isfile(path):
                return torch.load(path, map_location="cpu", weights_only=True)
        self.monitor.guard.warn_once("no-state", f"geomon: resuming at step {state.global_step} without a saved "
                                     f"monitor state ({name} in {directories}); windows start empty")  # fmt: skip
        return None

    def state_dict(self) -> dict[str, Any]:
        return self.monitor.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (now when attached, else at the next ``on_train_begin``)."""
        if self.monitor.plan is not None and self.monitor.model is not None:
            self.monitor.load_state_dict(state_dict)
        else:
            self._pending_state = state_dict
