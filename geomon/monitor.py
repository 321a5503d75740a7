"""The framework-neutral core: watch a model's forward passes on a schedule, in any training loop.

``with monitor.step(global_step, labels=y): loss = model(x)`` arms the capture only on scheduled steps (off-schedule
steps do nothing at all: no hooks, no host sync); ``monitor.compute()`` on those steps returns the values under
geomon's key scheme (a collective under DDP: call it on every rank) and starts the next window. What is watched:

- every attention call inside the model (queries and keys as the model really uses them, see
  :mod:`geomon.capture`): entropy, normalised entropy and max logit per module, per head in :attr:`Monitor.details`;
- the input of the output head (found automatically): RankMe / alpha-ReQ, and neural collapse against the head
  when labels are given; the outputs of any ``embedding_modules``; tensors handed to :meth:`Monitor.observe`;
- σ(W) and stable rank of the ``spectral_modules``.

Embedding and neural-collapse windows keep accumulating rows over measured steps until they hold ``4 x D``
(RankMe's small-sample bias), then report and reset.

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
    ['attention', 'nc', 'rankme', 'spectral']
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Any, Literal

import torch
from torch import Tensor, nn

from geomon.alerts import AlertEngine, AlertEvent, LoggingSink, Rule, default_rules
from geomon.capture import AttentionCall, capture_attention
from geomon.capture.modules import compiled_parts, find_head, head_dims, linear_like, resolve_patterns
from geomon.functional._dispatch import BACKENDS, Backend
from geomon.probes import AttentionProbe, CollapseProbe, EmbeddingProbe, SpectralProbe
from geomon.probes._sync import fsdp1_flattened, fsdp1_units, fsdp1_whole_parameters, multi_process
from geomon.probes.collapse import IGNORE_INDEX, head_weight
from geomon.probes.logit_map import LogitMapProbe
from geomon.reparam import sigma_reparam_stats

#: Neural collapse is switched on automatically only below this state size (C x D float64 values: 128 MiB).
AUTO_COLLAPSE_MAX_ELEMENTS = 1 << 24

#: Name components that wrappers insert between a module and its parent: FSDP1's ``FullyShardedDataParallel`` and
#: activation checkpointing's ``CheckpointWrapper``. geomon names modules without them.
WRAPPER_PARTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module"})

FSDP1_WEIGHTS = (
    "the model is sharded with FSDP1 (FullyShardedDataParallel): outside its forward a module's weight is only this "
    "rank's piece of a flat parameter, so geomon computes no weight-based value ({what}); attention, RankMe, "
    "alpha-ReQ and neural collapse (read during the forward pass) are computed. Shard with FSDP2 "
    "(torch.distributed.fsdp.fully_shard; Lightning's ModelParallelStrategy), whose weights geomon gathers whole"
)
WEIGHT_VALUES = "geomon/spectral/*: logit_sigma, entropy_bound, σReparam's gamma and sigma"


def plain_name(name: str) -> str:
    """``name`` without wrapper components (:data:`WRAPPER_PARTS`), as on the unwrapped model.

    Example:
        >>> plain_name("_fsdp_wrapped_module.blocks.0._fsdp_wrapped_module.attn")
        'blocks.0.attn'
    """
    return ".".join(part for part in name.split(".") if part not in WRAPPER_PARTS)


def plain_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``model``'s modules by :func:`plain_name`: names resolved before FSDP1 wraps the model still find their modules
    after, and keys read the same with or without the wrappers (a wrapper yields to the module it wraps)."""
    return {plain_name(name): module for name, module in model.named_modules()}


class Monitor:
    """Schedules capture on a model and turns what it captures into logged values.

    Args:
        every_n_steps: measure on steps where ``global_step % every_n_steps == 0``.
        attention: measure every attention call inside the model.
        head: the output head whose *input* feeds RankMe / alpha-ReQ (probe ``<head>.input``) and neural collapse:
            ``"auto"`` (the model's ``get_output_embeddings()`` or the last linear layer named like a head),
            a module name, or ``None``.
        neural_collapse: ``"auto"`` (on when a head is found and its ``C x D`` state is small, fed on steps that
            pass labels), ``True`` (a head is required), or ``False``.
        embedding_modules: ``fnmatch`` patterns over ``named_modules()``; each match's output ``[..., D]`` feeds
            RankMe and alpha-ReQ (alpha only where ``D > 100``).
        spectral_modules: ``fnmatch`` patterns of modules with a 2-D ``weight``: σ(W) and stable rank.
        entropy_bound: also log Theorem 3.1's entropy lower bound per attention layer (the inputs' largest
            singular value is measured on the measured step: a batched SVD per layer). The logit maps' spectral
            norms ``geomon/spectral/logit_sigma/<module>`` and, for σReparam layers, ``reparam_gamma``,
            ``reparam_sigma`` and ``reparam_ratio`` are always logged.
        window_rows: rows per RankMe / neural-collapse window (default ``4 x D``).
        query_rows: if set, measure at most this many evenly spaced query rows per attention call.
        alerts: rules evaluated on every :meth:`compute` given a ``step`` (``None``: the default rules: entropy
            collapse, max logit above 100, rank collapse, non-finite values; ``()``: none); events are logged on
            rank zero, counted under ``geomon/alerts/<rule>``, and kept in :attr:`events`.
        backend: kernels or torch (see :mod:`geomon.functional`).
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
        query_rows: int | None = None,
        alerts: Sequence[Rule] | None = None,
        backend: Backend = "auto",
        strict: bool = False,
    ) -> None:
        for name, value in (("every_n_steps", every_n_steps), ("window_rows", window_rows),
                            ("query_rows", query_rows)):  # fmt: skip
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if every_n_steps is None:
            raise ValueError("every_n_steps must be a positive integer, got None")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if neural_collapse not in (True, False, "auto"):
            raise ValueError(f"neural_collapse must be True, False or 'auto', got {neural_collapse!r}")
        for name, patterns in (("embedding_modules", embedding_modules), ("spectral_modules", spectral_modules)):
            if isinstance(patterns, str):
                raise TypeError(f"{name} must be a sequence of patterns, e.g. [{patterns!r}], not a string")
        self.every_n_steps, self.attention, self.head_option = every_n_steps, attention, head
        self.neural_collapse_option, self.window_rows, self.strict = neural_collapse, window_rows, strict
        self.patterns, self.spectral_patterns = list(embedding_modules), list(spectral_modules)
        self.backend, self.entropy_bound = backend, entropy_bound
        self.logit_maps = LogitMapProbe({})
        self.model: nn.Module | None = None
        self.head: str | None = None
        self.embedding_names: list[str] = []
        self.attention_probe = AttentionProbe(backend=backend, query_rows=query_rows)
        self.embeddings: dict[str, EmbeddingProbe] = {}
        self.collapse: CollapseProbe | None = None
        self.spectral = SpectralProbe([])
        self.details: dict[str, Tensor] = {}  #: per-head vectors of the latest compute (media, alert rules)
        self.spectra: dict[str, Tensor] = {}  #: singular values of the embedding windows closed by it (media)
        self.alert_engine = AlertEngine(default_rules() if alerts is None else alerts, [LoggingSink()], strict=strict)
        self.events: list[AlertEvent] = []  #: alert events of the latest compute
        self._labels: Tensor | None = None
        self._warned: set[str] = set()
        self._fsdp1 = False  # FSDP1 flattens the weights: no weight-based value (see attach)

    # setup -----------------------------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> Monitor:
        """Resolve what to watch on ``model``; a misconfiguration fails here, listing what was available."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"Monitor.attach needs a torch.nn.Module, got {type(model).__name__}")
        self._fsdp1 = self._uses_fsdp1(model)
        if self._fsdp1 and self.spectral_patterns:
            raise ValueError("spectral_modules cannot be measured: " + FSDP1_WEIGHTS.format(what="σ(W), stable rank"))
        with fsdp1_whole_parameters(model):  # FSDP1's flat shards hide the shapes the resolution reads
            self._resolve(model)
        if self._fsdp1:
            self._warn_once("fsdp1", "geomon: " + FSDP1_WEIGHTS.format(what=WEIGHT_VALUES))
        self.model = model
        return self

    def _resolve(self, model: nn.Module) -> None:
        modules = {name: module for name, module in plain_modules(model).items() if name}
        self.embedding_names = resolve_patterns(self.patterns, list(modules), "embedding_modules")
        linears = [name for name, module in modules.items() if linear_like(module)]
        spectral = resolve_patterns(self.spectral_patterns, linears, "spectral_modules (modules with a 2-D weight)")
        self.spectral = SpectralProbe(spectral)
        self.logit_maps = LogitMapProbe({} if self._fsdp1 else modules, bound=self.entropy_bound)
        head = find_head(model, self.head_option)
        self.head = None if head is None else plain_name(head)
        self.collapse = None
        if self.neural_collapse_option is True and self.head is None:
            raise ValueError("neural_collapse=True needs the output head: pass head=<module name>; modules with a "
                             f"2-D weight: {', '.join(linears[:40]) or '(none)'}")  # fmt: skip
        if self.head is not None and self.neural_collapse_option is not False:
            c, d = head_dims(modules[self.head])
            if self.neural_collapse_option is True or c * d <= AUTO_COLLAPSE_MAX_ELEMENTS:
                self.collapse = CollapseProbe(self.head + ".input", c, d, min_rows=self.window_rows,
                                              backend=self.backend)  # fmt: skip
            else:
                warnings.warn(f"geomon: neural collapse is off for head {self.head!r}: its {c} x {d} float64 state "
                              "is large; pass neural_collapse=True to watch it anyway", stacklevel=2)  # fmt: skip
        hooked = self.attention or self.embedding_names or self.head is not None
        compiled = compiled_parts(model)
        if compiled and hooked:
            raise ValueError(
                f"the model is compiled with torch.compile ({', '.join(repr(p) or 'the model' for p in compiled)}): "
                "forward hooks and the attention interception do not see inside a compiled graph, so attention "
                "entropy, the head's input and embedding_modules cannot be captured. Either attach geomon to the "
                "model before compiling it, or pass attention=False, head=None, embedding_modules=() and hand "
                "tensors to the monitor yourself (Monitor.observe, or a 'geomon' dict returned from training_step)."
            )

    @staticmethod
    def _uses_fsdp1(model: nn.Module) -> bool:
        return bool(fsdp1_units(model)) or any(fsdp1_flattened(module) for module in model.modules())

    def detach(self) -> None:
        """Forget the model (no hook outlives a :meth:`step` block anyway)."""
        self.model = None

    # capture ---------------------------------------------------------------------------------------------------
    def is_scheduled(self, global_step: int) -> bool:
        return global_step % self.every_n_steps == 0

    def step(self, global_step: int, labels: Tensor | None = None) -> Any:
        """Context manager around the forward pass of ``global_step``; a no-op off schedule.

        ``labels`` (one per row of the head's input, ``-100`` = none) feed neural collapse."""
        if self.model is None:
            raise RuntimeError("Monitor.step() before attach(model)")
        return self._armed(labels) if self.is_scheduled(global_step) else nullcontext()

    @contextmanager
    def _armed(self, labels: Tensor | None) -> Iterator[None]:
        assert self.model is not None
        modules = plain_modules(self.model)
        self._labels = labels
        with ExitStack() as stack:
            stack.callback(setattr, self, "_labels", None)
            for name in self.embedding_names:
                handle = modules[name].register_forward_hook(self._output_hook(name), always_call=True)
                stack.callback(handle.remove)
            if self.head is not None:
                handle = modules[self.head].register_forward_hook(self._head_hook, always_call=True)
                stack.callback(handle.remove)
            for name in self.logit_maps.names if self.entropy_bound else ():
                handle = modules[name].register_forward_pre_hook(self.logit_maps.pre_hook(name), with_kwargs=True)
                stack.callback(handle.remove)
            if self.attention:
                stack.enter_context(capture_attention(self.model, self._on_attention, strict=self.strict))
            yield

    def observe(self, name: str, tensor: Tensor) -> None:
        """Add embeddings ``[..., D]`` to probe ``name`` (``geomon/rankme/<name>``) yourself: for models that
        hooks cannot see into (``torch.compile``) or tensors that no module outputs."""
        self._guard(f"observed tensor {name!r}", self._on_embedding, name, tensor)

    def _guard(self, what: str, fn: Any, *args: Any) -> None:
        try:
            with torch.no_grad():
                fn(*args)
        except Exception as error:  # a probe must never break training
            if self.strict:
                raise
            warnings.warn(f"geomon: {what} failed and was skipped: {error!r}", stacklevel=3)

    def _on_attention(self, call: AttentionCall) -> None:
        if WRAPPER_PARTS.intersection(call.module.split(".")):
            call = dataclasses.replace(call, module=plain_name(call.module))
        self.attention_probe.update(call)

    def _output_hook(self, name: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            tensor = output[0] if isinstance(output, tuple) else output
            if isinstance(tensor, Tensor):
                self._guard(f"embedding capture of {name!r}", self._on_embedding, name, tensor)

        return hook

    def _head_hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if inputs and isinstance(inputs[0], Tensor):
            self._guard(f"capture of the input of head {self.head!r}", self._on_head_input, module, inputs[0])

    def _on_head_input(self, module: nn.Module, features: Tensor) -> None:
        assert self.head is not None
        features = features.detach()
        # the head's weight first, on every rank alike: gathering a sharded one (FSDP2) is a collective, so nothing
        # that may differ between ranks (labels, a failing capture) may decide whether it happens
        weight, bias = head_weight(module) if self.collapse is not None else (None, None)
        self._on_embedding(self.head + ".input", features)
        if self.collapse is None:
            return
        labels = self._labels
        if labels is None:
            self._warn_once(
                "labels",
                "geomon: neural collapse is on but this step has no labels (pass labels= to Monitor.step, or "
                "labels_fn= to GeomonCallback); its rows are skipped (neural_collapse=False silences this)",
            )
            if not multi_process():
                return  # one process: nothing to keep in step with
            # no row is labelled, but the head's weight is recorded as on a rank that has labels: every rank then
            # computes the same nc3 / unc3 (and evaluates the same alerts) from the synced window
            labels = torch.full(features.shape[:-1], IGNORE_INDEX, dtype=torch.long, device=features.device)
        self.collapse.update(features, labels, weight, bias)

    def _on_embedding(self, name: str, tensor: Tensor) -> None:
        rows = tensor.detach().reshape(-1, tensor.shape[-1])
        if name not in self.embeddings:
            self.embeddings[name] = EmbeddingProbe(name, rows.shape[1], min_rows=self.window_rows).to(rows.device)
        self.embeddings[name].update(rows)

    def _warn_once(self, tag: str, message: str) -> None:
        if tag not in self._warned:
            self._warned.add(tag)
            warnings.warn(message, stacklevel=3)

    # values ----------------------------------------------------------------------------------------------------
    def compute(self, step: int | None = None, *, spectra: bool = False) -> dict[str, Tensor]:
        """Scalar values of the finished windows (a collective under DDP: call it on every rank), keyed by geomon's
        scheme; per-head vectors go to :attr:`details` and, with ``spectra=True``, the singular values of each full
        embedding window to :attr:`spectra`, under the same keys. Given the ``step``, the alert rules run over the
        values and the per-head vectors: their events go to the sinks and :attr:`events`, their counts into the
        values as ``geomon/alerts/<rule>``."""
        values, self.details = self.attention_probe.compute()
        self.spectra = {}
        if self.model is not None:
            modules = plain_modules(self.model)
            if not self._fsdp1 and self._uses_fsdp1(self.model):  # wrapped after attach, as Lightning's FSDP does
                self._fsdp1 = True
                what = f"σ(W), stable rank, {WEIGHT_VALUES}" if self.spectral.metrics else WEIGHT_VALUES
                if self.strict and self.spectral.metrics:  # asked for by name: as attach would have refused it
                    raise RuntimeError("geomon: " + FSDP1_WEIGHTS.format(what=what))
                self._warn_once("fsdp1", "geomon: " + FSDP1_WEIGHTS.format(what=what))
                self.spectral, self.logit_maps = SpectralProbe([]), LogitMapProbe({})
            values.update(self.spectral.compute(modules))
            logit_sigma, per_head = self.logit_maps.compute(modules)
            values.update(logit_sigma)
            self.details.update(per_head)
            for name, stats in {} if self._fsdp1 else sigma_reparam_stats(self.model).items():
                prefix = plain_name(name)
                values.update({f"geomon/spectral/reparam_{stat}/{prefix}": value for stat, value in stats.items()})
        for probe in self.embeddings.values():
            scalars, spectrum = probe.compute(spectrum=spectra)
            values.update(scalars)
            self.spectra.update(spectrum)
        if self.collapse is not None:
            values.update(self.collapse.compute())
        self.events = []
        if step is not None and self.alert_engine.rules:
            dims = {name: probe.num_features for name, probe in self.embeddings.items()}
            for rule in self.alert_engine.rules:
                if callable(getattr(rule, "set_dims", None)):
                    rule.set_dims(dims)
            self.events = self.alert_engine.evaluate(step, values, self.details)
            values.update({key: torch.tensor(float(n)) for key, n in self.alert_engine.counters().items()})
        return values

    def state_dict(self) -> dict[str, Any]:
        """Open windows and power-iteration vectors, for checkpoints: a resumed run continues them."""
        return {
            "attention": self.attention_probe.state_dict(),
            "spectral": self.spectral.state_dict(),
            "embeddings": {name: probe.state_dict() for name, probe in self.embeddings.items()},
            "collapse": None if self.collapse is None else self.collapse.state_dict(),
            "alerts": self.alert_engine.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (after :meth:`attach`)."""
        self.attention_probe.load_state_dict(state.get("attention", {}))
        self.spectral.load_state_dict(state.get("spectral", {}))
        for name, probe_state in state.get("embeddings", {}).items():
            self.embeddings[name] = EmbeddingProbe.from_state_dict(name, probe_state)
        if self.collapse is not None and state.get("collapse") is not None:
            self.collapse.load_state_dict(state["collapse"])
        if "alerts" in state:
            self.alert_engine.load_state_dict(state["alerts"])
