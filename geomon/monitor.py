"""The framework-neutral core: watch a model's forward passes on a schedule, in any training loop.

``with monitor.step(global_step, labels=y): loss = model(x)`` arms the capture only on scheduled steps (off-schedule
steps do nothing at all: no hooks, no host sync); ``monitor.compute()`` on those steps returns the values under
geomon's key scheme (a collective under DDP: call it on every rank) and starts the next window. What is watched:

- every attention call inside the model (queries and keys as the model really uses them, see
  :mod:`geomon.capture`): entropy, normalised entropy and max logit per module, per head in :attr:`Monitor.details`;
- the input of the output head (found automatically): RankMe (uncentred, and of the centred covariance) /
  alpha-ReQ, and neural collapse against the head when labels are given; the outputs of any ``embedding_modules``;
  tensors handed to :meth:`Monitor.observe`;
- σ(W) and stable rank of the ``spectral_modules``.

Embedding and neural-collapse windows keep accumulating rows until they hold ``4 x D`` (RankMe's small-sample
bias), then report and reset; when one step has fewer rows than that (a classifier: one row per image), their hooks
also run on the steps just before each measured step, every step if need be, so that a window fills within a few
periods (:meth:`Monitor.fills`). What is watched is decided once, at :meth:`Monitor.attach`,
from the model's structure (:mod:`geomon.probes.plan`): every rank holds the same probes, so no rank can wait for
another in a reduction, and a value that nothing measured is simply not logged.

Example:
    >>> import torch
    >>> from geomon._tiny_gpt import TinyGPT
    >>> model = TinyGPT(vocab_size=30, d_model=32, context=16)
    >>> monitor = Monitor(every_n_steps=2).attach(model)
    >>> for step in range(3):
    ...     x, y = torch.randint(0, 30, (8, 16)), torch.randint(0, 30, (8, 16))
    ...     with monitor.step(step, labels=y):
    ...         logits = model(x)
    ...     values = monitor.compute() if monitor.is_scheduled(step) else {}
    >>> sorted({key.split("/")[1] for key in values})
    ['attention', 'nc', 'rankme', 'rankme_cov', 'spectral']
"""

from __future__ import annotations

import fnmatch
import inspect
import operator
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import replace
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from geomon._guard import Guard
from geomon.alerts import AlertEngine, AlertEvent, LoggingSink, Rule, default_rules
from geomon.capture.extra_forward import can_force_eager, extra_forward
from geomon.capture.modules import compiled_parts
from geomon.functional._common import check_flag, is_index_tensor
from geomon.functional._dispatch import BACKENDS, Backend
from geomon.probes._sync import fsdp1_flattened, fsdp1_units, fsdp1_whole_parameters
from geomon.probes.embedding import EmbeddingProbe
from geomon.probes.plan import MEMORY_BUDGET_MIB, Plan, PlanOptions, build_plan, unwrap

FSDP1_WEIGHTS = (
    "the model is sharded with FSDP1 (FullyShardedDataParallel): outside its forward a module's weight is only this "
    "rank's piece of a flat parameter, so geomon computes no weight-based value ({what}); attention, RankMe, "
    "alpha-ReQ and neural collapse (read during the forward pass) are computed. Shard with FSDP2 "
    "(torch.distributed.fsdp.fully_shard; Lightning's ModelParallelStrategy), whose weights geomon gathers whole"
)
REMEASURED = (
    "geomon: step {step} was already measured and computed, so monitor.step({step}) measures nothing more and "
    "compute({step}) returns nothing new (each step is reported once). Under gradient accumulation either open "
    "monitor.step(step) around one micro-batch per optimizer step, or open it around every micro-batch and call "
    "compute(step) once, after the optimizer step: the step's values then cover all of its micro-batches"
)
WEIGHT_VALUES = "geomon/spectral/*: logit_sigma, entropy_bound, σReparam's gamma and sigma"

COMPILED = (
    "the model is compiled with torch.compile ({parts}): forward hooks and the attention interception do not run "
    "inside the compiled graph, and adding them would change what is compiled, and so the training. Either measure "
    "by an extra forward pass that runs the model eagerly without gradients and leaves training as it was: "
    "Monitor.measure_forward(step, model, *inputs) before the step's training forward instead of monitor.step(step) "
    "(GeomonCallback(measure_forward=lambda module, batch: module(batch[0])) in Lightning), which costs one forward "
    "pass per measured step; or keep the compiled model as it is and pass attention=False, head=None, "
    "embedding_modules=() (spectral_modules and the attention layers' logit maps, read off the weights, still "
    "work) and hand the tensors you want measured to Monitor.observe (or return them under outputs['geomon'] from "
    "training_step)"
)
COMPILED_OLD_TORCH = "; Monitor.measure_forward needs torch >= 2.6 (torch.compiler.set_stance), this is torch {version}"


def check_rules(alerts: object) -> None:
    """A ``TypeError`` unless ``alerts`` is ``None`` or a sequence of rules (objects with an ``evaluate`` method)."""
    if alerts is None:
        return
    if isinstance(alerts, (str, bytes)) or not isinstance(alerts, Sequence):
        single = " (a single rule goes in a list: alerts=[rule])" if callable(getattr(alerts, "evaluate", None)) else ""
        raise TypeError(f"alerts must be None (the default rules), () (none) or a list of rules, got {alerts!r}"
                        f"{single}")  # fmt: skip
    for rule in alerts:
        if not callable(getattr(rule, "evaluate", None)):
            raise TypeError(f"alerts must hold rules (geomon.alerts.Rule, or objects with an evaluate method), got "
                            f"{rule!r} in {alerts!r}")  # fmt: skip


def checked_labels(labels: object) -> Tensor | None:
    """``labels`` if they are ``None`` or an integer tensor of class indices, else a ``TypeError`` saying what is
    allowed (float labels would be truncated, silently, by a cast)."""
    if labels is None:
        return None
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor of class indices (-100: none), one per row of the head's "
                        f"input, got {type(labels).__name__}")  # fmt: skip
    if not is_index_tensor(labels):
        raise TypeError(f"labels must be an integer tensor of class indices (int64, int32, ...; -100: none), got "
                        f"{labels.dtype}; cast whole-number labels with .long()")  # fmt: skip
    return labels


def checked_token_mask(token_mask: object) -> Tensor | None:
    """``token_mask`` if it is ``None`` or a 2-D bool or integer tensor ``[B, N]`` (True or nonzero: a real token, as
    in a Hugging Face ``attention_mask``), else a ``TypeError`` or ``ValueError`` saying what is allowed. Its values
    are not read here (that would sync the host with the device)."""
    if token_mask is None:
        return None
    if not isinstance(token_mask, Tensor):
        raise TypeError(f"token_mask must be a torch.Tensor [B, N] (1 or True: a real token, 0 or False: padding, as "
                        f"a Hugging Face attention_mask) or None, got {type(token_mask).__name__}")  # fmt: skip
    if token_mask.is_floating_point() or token_mask.is_complex():
        raise TypeError(f"token_mask must be a bool or integer tensor (1 or True: a real token, 0 or False: padding), "
                        f"got {token_mask.dtype}; an additive float mask (0 / -inf) is not a token mask: pass the "
                        f"batch's attention_mask, or (mask == 0) for an additive one")  # fmt: skip
    if token_mask.ndim != 2:
        raise ValueError(f"token_mask must be 2-D, [B, N] (one flag per token of each sequence, as a Hugging Face "
                         f"attention_mask), got shape {tuple(token_mask.shape)}")  # fmt: skip
    return token_mask


def step_number(step: object) -> int:
    """``step`` as an ``int`` (Python, numpy and 0-d integer tensors are accepted), else a ``TypeError``."""
    try:
        return operator.index(step)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"the step must be an integer (int, numpy integer or 0-d integer tensor), got {step!r}"
        ) from None


class Monitor:
    """Schedules capture on a model and turns what it captures into logged values.

    Args:
        every_n_steps: measure on steps where ``global_step % every_n_steps == 0``.
        attention: measure every attention call inside the model.
        head: the output head whose *input* feeds RankMe / alpha-ReQ (probe ``<head>.input``) and neural collapse:
            ``"auto"`` (the model's ``get_output_embeddings()``, else the last linear layer named like a head, else
            the last linear layer when it projects onto an embedding's rows; a warning at attach when none is found),
            a module name, or ``None``.
        neural_collapse: ``"auto"`` (on when a head is found and its ``C x D`` state is small, fed on steps that
            pass labels), ``True`` (a head is required), or ``False``.
        embedding_modules: ``fnmatch`` patterns over ``named_modules()``; each match's output ``[..., D]`` feeds
            RankMe and alpha-ReQ (alpha only where ``D > 100``).
        spectral_modules: ``fnmatch`` patterns of modules with a 2-D ``weight`` (``nn.Embedding`` excluded): σ(W)
            and stable rank.
        entropy_bound: also log Theorem 3.1's entropy lower bound per attention layer where the measured step
            shows that it holds (self-attention without causal rows, masks, additive biases, rotary embeddings or
            QK-norm; query biases are folded in), with one warning per layer where it does not (see
            :mod:`geomon.probes.logit_map`); the measured forwards' inputs are held (by reference) until ``compute``,
            which takes their largest singular value: a batched SVD per layer, none in the forward. The logit maps'
            spectral norms ``geomon/spectral/logit_sigma/<module>`` (not for rotary layers) and, for σReparam
            layers, ``reparam_gamma``, ``reparam_sigma`` and ``reparam_ratio`` are always logged.
        window_rows: rows per RankMe / neural-collapse window (default ``4 x D``).
        query_rows: measure at most this many evenly spaced query rows per head in each attention call; ``"auto"``
            (default): as many as keep the entropy's logits under 2% of the layer's forward FLOPs, but at least 128
            (:func:`geomon.probes.attention.auto_query_rows`); ``None``: every row.
        alerts: rules evaluated on every :meth:`compute` given a ``step`` (``None``: the default rules: entropy
            collapse, max logit above 100, rank collapse, non-finite values; ``()``: none); events are logged on
            rank zero, counted under ``geomon/alerts/<rule>``, and kept in :attr:`events`.
        backend: kernels or torch (see :mod:`geomon.functional`).
        memory_budget_mib: the most memory all probe state together may take (MiB, per process); :meth:`attach`
            fails naming the largest probes when the plan needs more, and a probe found later that would exceed it
            is dropped with a warning.
        strict: raise probe errors instead of warning (for tests).
    """

    def __init__(
        self,
        *,
        every_n_steps: int = 50,
        attention: bool = True,
        head: str | None = "auto",
        neural_collapse: bool | Literal["auto"] = "auto",
        embedding_modules: Sequence[str] = (),
        spectral_modules: Sequence[str] = (),
        entropy_bound: bool = False,
        window_rows: int | None = None,
        query_rows: int | Literal["auto"] | None = "auto",
        alerts: Sequence[Rule] | None = None,
        backend: Backend = "auto",
        memory_budget_mib: float = MEMORY_BUDGET_MIB,
        strict: bool = False,
    ) -> None:
        for name, value in (("every_n_steps", every_n_steps), ("window_rows", window_rows),
                            ("query_rows", None if query_rows == "auto" else query_rows)):  # fmt: skip
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                also = ", 'auto' or None" if name == "query_rows" else ""
                raise ValueError(f"{name} must be a positive integer{also}, got {value!r}")
        if every_n_steps is None:
            raise ValueError("every_n_steps must be a positive integer, got None")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if neural_collapse not in (True, False, "auto"):
            raise ValueError(f"neural_collapse must be True, False or 'auto', got {neural_collapse!r}")
        for name, flag in (("attention", attention), ("entropy_bound", entropy_bound), ("strict", strict)):
            check_flag(flag, name)
        if head is not None and not isinstance(head, str):
            raise TypeError(f"head must be 'auto', a module name or None, got {head!r}")
        for name, patterns in (("embedding_modules", embedding_modules), ("spectral_modules", spectral_modules)):
            if isinstance(patterns, str):
                raise TypeError(f"{name} must be a sequence of patterns, e.g. [{patterns!r}], not a string")
            if not isinstance(patterns, Sequence) or not all(isinstance(p, str) for p in patterns):
                raise TypeError(f"{name} must be a sequence of fnmatch patterns (strings), e.g. ['blocks.*.mlp'] "
                                f"or () for none, got {patterns!r}")  # fmt: skip
        check_rules(alerts)
        if isinstance(memory_budget_mib, bool) or not isinstance(memory_budget_mib, (int, float)) or \
                not memory_budget_mib > 0:  # fmt: skip
            raise ValueError(f"memory_budget_mib must be a positive number, got {memory_budget_mib!r}")
        self.every_n_steps, self.strict = every_n_steps, strict
        self.options = PlanOptions(
            attention=attention, head=head, neural_collapse=neural_collapse,
            embedding_modules=tuple(embedding_modules), spectral_modules=tuple(spectral_modules),
            entropy_bound=entropy_bound, window_rows=window_rows, query_rows=query_rows, backend=backend,
            memory_budget_mib=memory_budget_mib,
        )  # fmt: skip
        self.guard = Guard(strict)
        self.model: nn.Module | None = None
        self.plan: Plan | None = None
        self.details: dict[str, Tensor] = {}  #: per-head vectors of the latest compute (media, alert rules)
        self.spectra: dict[str, Tensor] = {}  #: singular values of the embedding windows closed by it (media)
        self.alert_engine = AlertEngine(default_rules() if alerts is None else alerts, [LoggingSink()], strict=strict)
        self.events: list[AlertEvent] = []  #: alert events of the latest compute
        self._measured = False  # a step was measured since the last compute
        self._computed_step: int | None = None  # the last step whose measurement compute(step) reported
        self._fsdp1 = False  # FSDP1 flattens the weights: no weight-based value (see attach)
        #: the compiled parts the hook-based probes cannot see into, named (``""``: none); such a model is measured
        #: by :meth:`measure_forward`, not by :meth:`step`
        self.compiled = ""
        self._in_extra_forward = False
        self._patterns_checked = False  # the rules' key patterns are checked at the first compute with a step

    @property
    def reads_forward(self) -> bool:
        """Whether a probe reads the forward pass (attention, the head's input, ``embedding_modules``), rather than
        only the weights."""
        options = self.options
        return options.attention or bool(options.embedding_modules) or options.head is not None

    @property
    def head(self) -> str | None:
        """The output head's name (plain), once attached."""
        return None if self.plan is None else self.plan.head

    @property
    def collapse(self) -> Any:
        """The neural-collapse probe, or ``None``."""
        found = [] if self.plan is None else self.plan.of_kind("collapse")
        return found[0] if found else None

    # setup -----------------------------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> Monitor:
        """Decide what to watch on ``model`` (the plan) and allocate its state; a misconfiguration fails here,
        listing what was available.

        ``model`` may be the wrapper a framework returned (DDP, Lightning Fabric's ``fabric.setup``, accelerate's
        ``prepare``, ``torch.compile``: :data:`geomon.probes.plan.MODEL_WRAPPERS`): the monitor watches the model
        inside, and module names (keys, ``head``, ``embedding_modules``, ``spectral_modules``) are those of the
        unwrapped model."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"Monitor.attach needs a torch.nn.Module, got {type(model).__name__}")
        options = self.options
        compiled = compiled_parts(model)
        parts = ", ".join(repr(p) if p else "the model" for p in compiled)
        self.compiled = parts if compiled and self.reads_forward else ""
        if self.compiled and not can_force_eager():
            old_torch = COMPILED_OLD_TORCH.format(version=torch.__version__)
            raise ValueError(COMPILED.format(parts=self.compiled) + old_torch)
        model = unwrap(model)
        self._fsdp1 = bool(fsdp1_units(model)) or any(fsdp1_flattened(module) for module in model.modules())
        if self._fsdp1 and options.spectral_modules:
            raise ValueError("spectral_modules cannot be measured: " + FSDP1_WEIGHTS.format(what="σ(W), stable rank"))
        with fsdp1_whole_parameters(model):  # FSDP1's flat shards hide the shapes the plan reads
            self.plan = build_plan(model, replace(options, weights=not self._fsdp1), self.guard)
        if self._fsdp1:
            self.guard.warn_once("fsdp1", "geomon: " + FSDP1_WEIGHTS.format(what=WEIGHT_VALUES))
        self.plan.allocate(next((p.device for p in model.parameters()), self.plan.device))
        self.model = model
        self._patterns_checked = False  # a new plan: new keys
        self._restart()  # a new plan: the steps a previous one measured or reported are not this one's
        return self

    def _restart(self) -> None:
        """Forget which step was last measured and reported: a fresh plan (:meth:`attach`) or a restored state
        (:meth:`load_state_dict`, a resumed or rolled-back run that may replay steps already reported) measures
        every step it is given again."""
        self._measured, self._computed_step = False, None

    def detach(self) -> None:
        """Forget the model (no hook outlives a :meth:`step` block anyway)."""
        self.model = None

    # capture ---------------------------------------------------------------------------------------------------
    def is_scheduled(self, global_step: int) -> bool:
        return step_number(global_step) % self.every_n_steps == 0

    def fills(self, global_step: int) -> bool:
        """Whether ``global_step``, off schedule, is a fill step: one of the steps just before a measured step on
        which the head input's (and ``embedding_modules``') hooks add rows to windows that one step cannot fill
        (see :class:`~geomon.probes.embedding.EmbeddingProbe`). Decided on the host: no sync."""
        if self.plan is None or self.is_scheduled(global_step):
            return False
        return bool(self.plan.fill_probes(-step_number(global_step) % self.every_n_steps))

    def step(self, global_step: int, labels: Tensor | None = None, token_mask: Tensor | None = None) -> Any:
        """Context manager around the forward pass of ``global_step``: everything is measured on scheduled steps;
        on fill steps (:meth:`fills`) only the windowed probes' hooks run (a Gram and sums updated on the device);
        a no-op otherwise.

        ``labels`` (one per row of the head's input, ``-100`` = none) feed neural collapse. ``token_mask`` (``[B, N]``,
        bool or integer, True or 1 = a real token: a Hugging Face ``attention_mask``) leaves padding out of RankMe /
        alpha-ReQ: rows of a hooked embedding tensor ``[B, N, D]`` (the head's input, ``embedding_modules``) at
        padding positions are not counted; a tensor of another leading shape is measured whole, and a warning says
        so once per probe (see :class:`~geomon.probes.embedding.EmbeddingProbe`). Neural collapse leaves out rows
        labelled ``-100`` instead. Every block opened on a
        scheduled step adds to that step's measurement (several micro-batches: one ``compute(step)`` after them all),
        until :meth:`compute` reports the step; after that, blocks for the same step measure nothing (a warning says
        so once) until :meth:`attach` or :meth:`load_state_dict` starts afresh (a resumed or rolled-back run replays
        steps: they are measured again)."""
        if self.model is None or self.plan is None:
            raise RuntimeError("Monitor.step() before attach(model)")
        if self.compiled and not self._in_extra_forward:
            raise ValueError(COMPILED.format(parts=self.compiled))
        return self._step(global_step, labels, token_mask)

    def _step(self, global_step: int, labels: Tensor | None, token_mask: Tensor | None = None) -> Any:
        assert self.model is not None and self.plan is not None
        labels, token_mask = checked_labels(labels), checked_token_mask(token_mask)
        if not self.is_scheduled(global_step):
            fill = self.plan.fill_probes(-step_number(global_step) % self.every_n_steps)
            if not fill:
                return nullcontext()
            return self.plan.armed(self.model, labels, only=fill, eager=self._in_extra_forward, token_mask=token_mask)
        if step_number(global_step) == self._computed_step:
            self.guard.warn_once("step computed", REMEASURED.format(step=self._computed_step))
            return nullcontext()
        self._measured = True
        return self.plan.armed(self.model, labels, eager=self._in_extra_forward, token_mask=token_mask)

    def measure_forward(
        self, global_step: int, forward: Callable[..., Any], *args: Any, labels: Tensor | None = None,
        token_mask: Tensor | None = None, **kwargs: Any,
    ) -> None:  # fmt: skip
        """Measure ``global_step`` by an extra forward pass, ``forward(*args, **kwargs)``, whose output is dropped:
        for a ``torch.compile``'d model, whose own forward hooks cannot see into. A no-op off schedule (and on
        fill steps it feeds the windowed probes only, as :meth:`step` does).

        The pass runs without autograd, with compiled code run eagerly (the compiled graph is neither used nor
        changed), and with the random-number state and the model's buffers restored after it, so training goes on
        as it would have without it (see :mod:`geomon.capture.extra_forward`). It costs one forward pass without
        gradients per step it measures. Call it before the training forward of the step, on the same batch, to
        measure the weights that forward uses. An error inside it is a warning and a skipped measurement (raised
        with ``strict=True``); ``labels`` feed neural collapse and ``token_mask`` leaves padding out of RankMe /
        alpha-ReQ, as in :meth:`step` (neither is passed to ``forward``).

        A training loop (``model``, ``loader``, ``loss_fn``, ``optimizer`` yours)::

            compiled = torch.compile(model)
            monitor = Monitor(every_n_steps=50).attach(compiled)
            for step, (x, y) in enumerate(loader):
                monitor.measure_forward(step, compiled, x, labels=y)  # before the training forward
                loss = loss_fn(compiled(x), y)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                if monitor.is_scheduled(step):
                    values = monitor.compute(step)
        """
        if self.model is None or self.plan is None:
            raise RuntimeError("Monitor.measure_forward() before attach(model)")
        if not callable(forward):
            raise TypeError(f"Monitor.measure_forward needs a callable forward (the model, or a function), got "
                            f"{forward!r}")  # fmt: skip
        labels, token_mask = checked_labels(labels), checked_token_mask(token_mask)
        if not (self.is_scheduled(global_step) or self.fills(global_step)):
            return
        self.guard.run("the extra measuring forward", self._extra_forward, global_step, (labels, token_mask), forward,
                       args, kwargs)  # fmt: skip

    def _extra_forward(self, global_step: int, given: tuple[Tensor | None, Tensor | None],
                       forward: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> None:  # fmt: skip
        assert self.model is not None
        self._in_extra_forward = True
        try:
            with extra_forward(self.model), self._step(global_step, *given), warnings.catch_warnings():
                # torch says that geomon's global hooks (armed in this block only) also fire for the compiled
                # wrapper: they do, and they ignore it (it is not one of the model's named modules)
                warnings.filterwarnings(
                    "ignore", message=r"Using `torch.compile\(module\)` when there are global hooks"
                )
                forward(*args, **kwargs)
        finally:
            self._in_extra_forward = False

    def observe(self, name: str, tensor: Tensor) -> None:
        """Add embeddings ``[..., D]`` to probe ``name`` (``geomon/rankme/<name>``, ...) yourself: for models that
        hooks cannot see into (``torch.compile``) or tensors that no module outputs."""
        if self.plan is None:
            raise RuntimeError("Monitor.observe() before attach(model)")
        if not isinstance(name, str) or not name:
            raise TypeError(f"Monitor.observe needs a non-empty name (str), got {name!r}")
        if "/" in name:
            raise ValueError(f"Monitor.observe: name {name!r} holds '/', which separates the parts of geomon's keys "
                             f"(geomon/<family>/<name>); use '.' instead, e.g. {name.replace('/', '.')!r}")  # fmt: skip
        if not isinstance(tensor, Tensor) or tensor.ndim < 1 or tensor.shape[-1] < 1:
            what = f"shape {tuple(tensor.shape)}" if isinstance(tensor, Tensor) else type(tensor).__name__
            raise TypeError(f"Monitor.observe({name!r}, ...) needs a tensor of embeddings [..., D] with D >= 1, got "
                            f"{what}")  # fmt: skip
        self.guard.run(f"observed tensor {name!r}", self.plan.observe, name, tensor)

    # values ----------------------------------------------------------------------------------------------------
    def compute(self, step: int | None = None, *, spectra: bool = False) -> dict[str, Tensor]:
        """Scalar values of what was measured since the last compute (a collective under DDP: call it on every
        rank), keyed by geomon's scheme; nothing for what no rank measured. Per-head vectors go to :attr:`details`
        and, with ``spectra=True``, the singular values of each full embedding window to :attr:`spectra`, under
        the same keys. A step is reported once: ``compute(step)`` again, with nothing measured since, returns ``{}``.
        Given the ``step``, the alert rules run over the values and the per-head vectors: their
        events go to the sinks and :attr:`events`, their counts into the values as ``geomon/alerts/<rule>``."""
        step = None if step is None else step_number(step)
        self.details, self.spectra, self.events = {}, {}, []
        if self.model is None or self.plan is None or (step == self._computed_step and not self._measured):
            return {}  # a step already reported: once per step, whatever calls compute again (every rank alike)
        if step is not None:
            self._computed_step = step
        self._check_fsdp1()
        measured, self._measured = self._measured, False
        out = self.plan.compute(self.model, spectra=spectra, measured=measured)
        values, self.details, self.spectra = out.scalars, out.details, out.spectra
        if step is not None and self.alert_engine.rules:
            self.alert_engine.is_rank_zero = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
            dims = {p.name: p.spec[0] for p in self.plan.of_kind(EmbeddingProbe.kind) if p.agreed}
            for rule in self.alert_engine.rules:
                if callable(getattr(rule, "set_dims", None)):
                    rule.set_dims(dims)
            if not self._patterns_checked:
                self._patterns_checked = True
                self.guard.run("checking the alert patterns", self._check_patterns, values)
            self.events = self.guard.run("alert evaluation", self.alert_engine.evaluate, step, values, self.details,
                                         default=[])  # fmt: skip
            values.update({name: torch.tensor(float(n)) for name, n in self.alert_engine.counters().items()})
        return values

    def _check_patterns(self, values: dict[str, Tensor]) -> None:
        """Name, once, each rule whose key pattern (given, not its class's default) matches none of the keys this
        monitor logs: it could never fire (a typo, a key logged by the training loop rather than by geomon)."""
        assert self.plan is not None
        known = {*self.plan.keys(), *values}
        for rule in self.alert_engine.rules:
            pattern = getattr(rule, "pattern", None)
            default = inspect.signature(type(rule)).parameters.get("pattern")
            if not isinstance(pattern, str) or (default is not None and pattern == default.default):
                continue
            if not any(fnmatch.fnmatchcase(key, pattern) for key in known):
                families = ", ".join(sorted({key.rsplit("/", 1)[0] + "/*" for key in known})) or "none"
                self.guard.warn_once(f"pattern:{rule.name}", f"geomon: alert rule {rule.name!r} watches {pattern!r}, "
                                     f"which matches none of the keys this monitor logs ({families}), so it cannot "
                                     "fire; the rules see geomon's values only")  # fmt: skip

    def _check_fsdp1(self) -> None:
        """FSDP1 wrapped the model after attach (a plain loop that wraps late): drop the weight-based probes."""
        assert self.model is not None and self.plan is not None
        if self._fsdp1 or not (fsdp1_units(self.model) or any(fsdp1_flattened(m) for m in self.model.modules())):
            return
        self._fsdp1 = True
        asked = bool(self.options.spectral_modules)
        what = f"σ(W), stable rank, {WEIGHT_VALUES}" if asked else WEIGHT_VALUES
        if self.strict and asked:  # asked for by name: as attach would have refused it
            raise RuntimeError("geomon: " + FSDP1_WEIGHTS.format(what=what))
        self.guard.warn_once("fsdp1", "geomon: " + FSDP1_WEIGHTS.format(what=what))
        for probe in [p for p in self.plan if p.weight_based]:
            self.plan.probes.pop(probe.pid)

    def state_dict(self) -> dict[str, Any]:
        """Open windows and power-iteration vectors, for checkpoints: a resumed run continues them."""
        return {"plan": {} if self.plan is None else self.plan.state_dict(), "alerts": self.alert_engine.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (after :meth:`attach`)."""
        if self.plan is None:
            raise RuntimeError("Monitor.load_state_dict() before attach(model)")
        if "plan" not in state:
            raise ValueError("this monitor state was saved by an older geomon (no 'plan'); it cannot be restored")
        self.plan.load_state_dict(state["plan"])
        self._restart()
        if "alerts" in state:
            self.alert_engine.load_state_dict(state["alerts"])
