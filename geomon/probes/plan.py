"""The plan: what a monitor watches on a model, decided once at attach and identical on every rank.

:func:`build_plan` reads the model's structure alone (never a forward pass, so every rank builds the same plan):
one probe per attention module a capture adapter recognises, the head's input (RankMe, alpha-ReQ, neural collapse),
the ``embedding_modules``, the ``spectral_modules``, the logit map of every attention module with a known layout and
every σReparam layer. Probes are kept in the order of their ids (``<kind>:<name>``), and their state exists from the
start, so ranks can never disagree about what is reduced, whatever each of them ran: a probe that saw nothing on a
rank reduces zeros, and a value that no rank measured is not logged.

What the structure cannot tell is settled by agreement, never by position: an attention call inside a module no
adapter recognises, a tensor handed to ``observe``, an embedding whose width only its output shows. Such a probe is
created where it is first seen, and at the next compute, before any reduction, the ranks exchange the ids and shapes
they learnt (one small ``all_gather_object``) and every rank holds the union, in id order (:meth:`Plan.agree`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from geomon._guard import Guard
from geomon.capture import AttentionCall, capture_attention, find_attention_modules
from geomon.capture._session import ScoresCall, traced_since
from geomon.capture.modules import HEAD_RULES, find_head, head_count, head_dims, linear_like, resolve_patterns
from geomon.functional import GeomonWarning
from geomon.functional._dispatch import Backend
from geomon.probes._sync import multi_process
from geomon.probes.attention import AttentionProbe, rows_to_measure
from geomon.probes.base import Context, Probe, Step, Values
from geomon.probes.collapse import CollapseProbe
from geomon.probes.embedding import EmbeddingProbe
from geomon.probes.logit_map import LogitMapProbe, logit_map_probe
from geomon.probes.spectral import ReparamProbe, SpectralProbe, reparam_layers

#: Neural collapse is switched on automatically only below this state size (C x D float64 values: 128 MiB).
AUTO_COLLAPSE_MAX_ELEMENTS = 1 << 24

#: Default of :attr:`PlanOptions.memory_budget_mib`: all probe state together.
MEMORY_BUDGET_MIB = 4096  # the head-input RankMe of a D = 8192 model (Llama-70B) takes 512 MiB

#: Name components that wrappers insert between a module and its parent: FSDP1's ``FullyShardedDataParallel`` and
#: activation checkpointing's ``CheckpointWrapper`` and ``torch.compile``'s ``OptimizedModule`` (``_orig_mod``).
#: geomon names modules without them.
WRAPPER_PARTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})

#: Wrappers around a whole model, by qualified class name (of the class or a base), with the attribute holding the
#: model they wrap: torch's DDP and DataParallel (``module``), Lightning Fabric's ``_FabricModule``
#: (``_forward_module``), DeepSpeed's engine (``module``; accelerate's DeepSpeed runs) and ``torch.compile``'s
#: ``OptimizedModule`` (``_orig_mod``). accelerate's ``prepare`` adds no class of its own: it returns the model or
#: one of these. :func:`unwrap` removes them from the object a monitor is attached to, so that keys name modules as
#: on the unwrapped model. FSDP1's root is not among them (:data:`WRAPPER_PARTS` drops its name parts instead: the
#: monitor needs the root to gather the flat parameters).
MODEL_WRAPPERS = {
    "torch.nn.parallel.distributed.DistributedDataParallel": "module",
    "torch.nn.parallel.data_parallel.DataParallel": "module",
    "lightning.fabric.wrappers._FabricModule": "_forward_module",
    "lightning_fabric.wrappers._FabricModule": "_forward_module",
    "deepspeed.runtime.engine.DeepSpeedEngine": "module",
    "torch._dynamo.eval_frame.OptimizedModule": "_orig_mod",
}

MIB = 1 << 20

TRACED = (
    "geomon: the model ran inside a torch.compile'd function on a measured step. Under compilation geomon's hooks "
    "and attention capture do nothing (whatever they did would be compiled into the graph and change the training), "
    "so nothing read during the forward was measured there: attention, the head's input, embedding_modules. "
    "Weight-based values (spectral_modules, logit_sigma) still are. From now on geomon arms nothing during "
    "monitor.step (its hooks and interception would only make the compiled graph recompile); measure by an extra "
    "eager forward with Monitor.measure_forward(step, model, *inputs), hand tensors to Monitor.observe (or return "
    "them under outputs['geomon'] from training_step), or call the model outside the compiled function"
)
NESTED = (
    "geomon: a monitor.step block was opened inside another block of the same monitor; the inner one measures "
    "nothing of its own (the outer block's hooks already see its forward, once)"
)
TRANSFORMED = (
    "geomon: the model ran inside a torch.func transform (vmap, grad, jacrev, ...) on a measured step. Its tensors "
    "are the transform's wrappers, which must not leave it, so geomon's hooks and attention capture do nothing there "
    "and nothing read during that forward was measured (attention, the head's input, embedding_modules); forwards "
    "outside the transform in the same step still are, and so are weight-based values (spectral_modules, logit_sigma)"
)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside the wrappers of :data:`MODEL_WRAPPERS` around ``model`` (``model`` itself if it is none).

    Only the object handed over is unwrapped, layer after layer (``torch.compile`` around Fabric around DDP); a
    submodule that happens to be called ``module`` keeps its name.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> unwrap(torch.nn.DataParallel(model)) is model
        True
    """
    while True:
        attribute = next((MODEL_WRAPPERS[name] for name in map(_qualified_name, type(model).__mro__)
                          if name in MODEL_WRAPPERS), None)  # fmt: skip
        inner = None if attribute is None else model._modules.get(attribute)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


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


@dataclass(frozen=True)
class PlanOptions:
    """What to watch (the :class:`geomon.Monitor` arguments of the same names)."""

    attention: bool = True
    head: str | None = "auto"
    neural_collapse: bool | Literal["auto"] = "auto"
    embedding_modules: Sequence[str] = ()
    spectral_modules: Sequence[str] = ()
    entropy_bound: bool = False
    window_rows: int | None = None
    query_rows: int | Literal["auto"] | None = "auto"
    backend: Backend = "auto"
    weights: bool = True  #: weight-based probes (off under FSDP1, whose module weights are flat shards)
    memory_budget_mib: float = MEMORY_BUDGET_MIB


def output_features(module: nn.Module) -> int | None:
    """The width of ``module``'s output as its parameters tell it (linear layers, embeddings, norms), else ``None``."""
    if linear_like(module):
        return head_dims(module)[0]
    if isinstance(module, nn.Embedding):
        return module.embedding_dim
    weight = getattr(module, "weight", None)
    if isinstance(weight, Tensor) and weight.ndim == 1 and not list(module.children()):  # LayerNorm, RMSNorm
        return weight.shape[0]
    return None


def build_plan(model: nn.Module, options: PlanOptions, guard: Guard | None = None) -> Plan:
    """The plan for ``model`` (no state allocated yet: see :meth:`Plan.allocate`); a misconfiguration fails here,
    listing what was available."""
    plan = Plan(options, guard or Guard())
    modules = {name: module for name, module in plain_modules(model).items() if name}
    linears = [name for name, module in modules.items() if linear_like(module)]
    if options.attention:
        for name in find_attention_modules(model):
            name = plain_name(name)
            plan.add(AttentionProbe(name, head_count(modules.get(name) or model), backend=options.backend,
                                    query_rows=options.query_rows))  # fmt: skip
    head = find_head(model, options.head)
    plan.head = None if head is None else plain_name(head)
    if head is None and options.head == "auto" and linears:
        last = ", ".join(linears[-8:])
        plan.guard.warn_once("head", f"geomon: head='auto' found no output head in {type(model).__name__} (looked for "
                             f"{'; '.join(HEAD_RULES)}): no RankMe of the head's input and no neural collapse. Pass "
                             f"head='<module name>' (the last modules with a 2-D weight, nn.Embedding "
                             f"excluded: {last}), or head=None to "
                             "silence this")  # fmt: skip
    if options.neural_collapse is True and plan.head is None:
        raise ValueError("neural_collapse=True needs the output head: pass head=<module name>; modules with a "
                         f"2-D weight (nn.Embedding excluded): {', '.join(linears[:40]) or '(none)'}")  # fmt: skip
    if plan.head is not None:
        classes, features = head_dims(modules[plan.head])
        plan.add(EmbeddingProbe(plan.head + ".input", features, module=plan.head, source="input",
                                min_rows=options.window_rows))  # fmt: skip
        if options.neural_collapse is True or (options.neural_collapse == "auto" and
                                               classes * features <= AUTO_COLLAPSE_MAX_ELEMENTS):  # fmt: skip
            plan.add(CollapseProbe(plan.head, classes, features, min_rows=options.window_rows,
                                   backend=options.backend))  # fmt: skip
        elif options.neural_collapse == "auto":
            warnings.warn(
                f"geomon: neural collapse is off for head {plan.head!r}: its {classes} x {features} float64 state "
                "is large; pass neural_collapse=True to watch it anyway",
                GeomonWarning,
                stacklevel=3,
            )
    for name in resolve_patterns(options.embedding_modules, list(modules), "embedding_modules"):
        plan.add(EmbeddingProbe(name, output_features(modules[name]), module=name, min_rows=options.window_rows))
    what = "spectral_modules (modules with a 2-D weight, nn.Embedding excluded)"
    spectral = resolve_patterns(options.spectral_modules, linears, what)
    if options.weights:
        for name in spectral:
            plan.add(SpectralProbe(name))
        for name, module in modules.items():
            if (logit_map := logit_map_probe(name, module, bound=options.entropy_bound, guard=plan.guard)) is not None:
                plan.add(logit_map)
        for name in reparam_layers(modules):
            plan.add(ReparamProbe(name))
    plan.check_budget()
    return plan


class Plan:
    """The probes of one monitored model, in a stable order; see the module docstring."""

    def __init__(self, options: PlanOptions, guard: Guard) -> None:
        self.options, self.guard = options, guard
        self.probes: dict[str, Probe] = {}
        self.head: str | None = None
        self.dropped: set[str] = set()  # probes given up (ranks disagreed on their shape, over the memory budget)
        self._step: Step | None = None  # the measured step being armed: attention calls mark it
        self._compiled_forward = False  # a measured forward ran under torch.compile: arm nothing more (see armed)
        #: the probe whose rows the token masks describe (a sequence-to-sequence model's decoder mask describes the
        #: head's input alone; the callbacks set it); None: every probe whose rows a mask aligns with
        self.token_mask_rows: str | None = None
        self.device = torch.device("cpu")

    def add(self, probe: Probe) -> Probe:
        self.probes[probe.pid] = probe
        self.probes = dict(sorted(self.probes.items()))
        return probe

    def __iter__(self) -> Iterator[Probe]:
        return iter(self.probes.values())

    def of_kind(self, kind: str) -> list[Probe]:
        return [probe for probe in self if probe.kind == kind]

    def keys(self) -> list[str]:
        """Every scalar key the plan can log (alert counters aside)."""
        return [name for probe in self for name in probe.keys()]  # noqa: SIM118

    # memory -----------------------------------------------------------------------------------------------------
    def state_bytes(self) -> int:
        return sum(probe.state_bytes() for probe in self)

    def check_budget(self) -> None:
        """Fail if the probes' state exceeds the memory budget, naming the largest."""
        budget = self.options.memory_budget_mib * MIB
        if self.state_bytes() <= budget:
            return
        sizes = sorted(((probe.state_bytes(), probe.pid) for probe in self), reverse=True)
        listed = ", ".join(f"{pid} {size / MIB:.1f} MiB" for size, pid in sizes[:12] if size)
        raise ValueError(
            f"geomon's probes would hold {self.state_bytes() / MIB:.1f} MiB of state, over memory_budget_mib="
            f"{self.options.memory_budget_mib:g}: {listed}. Narrow embedding_modules, pass neural_collapse=False, "
            "or raise memory_budget_mib"
        )

    def allocate(self, device: torch.device) -> None:
        """Create the state of every probe whose shape is known, on ``device``."""
        self.device = device
        for probe in self:
            probe.allocate(device)

    # feeding ----------------------------------------------------------------------------------------------------
    def attention_call(self, call: AttentionCall) -> None:
        """Route one captured attention call to its module's probe (created here if no adapter planned it)."""
        logit_map = self.probes.get(f"{LogitMapProbe.kind}:{plain_name(call.module)}")
        if isinstance(logit_map, LogitMapProbe):
            logit_map.note_call(call)  # what the entropy bound's conditions need to see
        probe = self._attention_probe(call.module, call.q.shape[1])
        if probe is not None:
            probe.update(call)

    def scores_call(self, call: ScoresCall) -> None:
        """Route attention read at a module's own softmax to its module's probe (created here if none is planned)."""
        logit_map = self.probes.get(f"{LogitMapProbe.kind}:{plain_name(call.module)}")
        if isinstance(logit_map, LogitMapProbe):
            logit_map.note_scores()
        probe = self._attention_probe(call.module, call.entropy.shape[1])
        if probe is not None:
            probe.update_rows(call)

    def _attention_probe(self, module: str, heads: int) -> AttentionProbe | None:
        """The attention probe of ``module`` (created if none is planned) when a call of ``heads`` query heads fits
        it; ``None`` (said once) when it does not, or when the probe was dropped."""
        name = plain_name(module)
        pid = f"{AttentionProbe.kind}:{name}"
        if pid in self.dropped:
            return None
        probe = self.probes.get(pid)
        if probe is None:
            probe = self.add(AttentionProbe(name, None, backend=self.options.backend,
                                            query_rows=self.options.query_rows))  # fmt: skip
        assert isinstance(probe, AttentionProbe)
        if probe.accepts_heads(heads):
            return probe
        self.guard.warn_once(f"heads:{name}", f"geomon: attention module {name!r} is planned with "
                             f"{probe.spec[0]} heads, but a call had {heads}; such calls are skipped")  # type: ignore[index]  # fmt: skip
        return None

    def observe(self, name: str, tensor: Tensor) -> None:
        """Add rows ``[..., D]`` to the embedding probe ``name`` (created on first use)."""
        pid = f"{EmbeddingProbe.kind}:{name}"
        if pid in self.dropped:
            return
        probe = self.probes.get(pid) or self.add(EmbeddingProbe(name, None, min_rows=self.options.window_rows))
        assert isinstance(probe, EmbeddingProbe)
        if not probe.update(tensor):
            self.guard.warn_once(f"features:{name}", f"geomon: probe {name!r} has {probe.spec[0]} features but "  # type: ignore[index]
                                 f"got a tensor of shape {tuple(tensor.shape)}; it is skipped")  # fmt: skip

    def fill_probes(self, steps_to_compute: int) -> list[Probe]:
        """The probes whose hooks run on a step ``steps_to_compute`` optimizer steps before the next measured one:
        those whose :meth:`~geomon.probes.base.Probe.lead_steps` reach back that far (host-side: no sync)."""
        world = dist.get_world_size() if multi_process() else 1
        return [p for p in self if p.module is not None and p.lead_steps(world) > steps_to_compute]

    @contextmanager
    def armed(self, model: nn.Module, labels: Tensor | None, only: Sequence[Probe] | None = None,
              eager: bool = False, token_mask: Tensor | None = None) -> Iterator[None]:  # fmt: skip
        """The hooks of one measured step, removed however the block exits; with ``only``, the hooks of a fill step:
        those probes' alone (no attention capture). Inside another block of this plan it does nothing (the outer
        block's hooks already see the forward: a second set would count every row twice), and says so once.

        Once a measured forward has run under ``torch.compile`` (the model called inside a compiled function), no
        later block arms anything, unless ``eager`` (an extra forward run with compiled code forced eager): the
        hooks measure nothing there, and the attention interception, a new function each step, would make Dynamo
        recompile the graph at every measured step until its recompile limit sent the frame back to eager for the
        rest of the run."""
        if self._step is not None:
            self.guard.warn_once("nested", NESTED)
            yield
            return
        if self._compiled_forward and not eager:
            yield
            return
        step = Step(
            labels, self.guard, fill=only is not None, token_mask=token_mask, token_mask_rows=self.token_mask_rows
        )
        modules = plain_modules(model)
        hooked = []
        with ExitStack() as stack:
            for probe in list(self) if only is None else only:
                if probe.module is None:
                    continue
                module = modules.get(probe.module)
                if module is None:
                    self._missing(probe.module, probe)
                    continue
                for handle in probe.arm(module, step):
                    stack.callback(handle.remove)
                    hooked.append(probe.module)
            if self.options.attention and only is None:
                stack.enter_context(capture_attention(model, self._on_attention, strict=self.guard.strict,
                                                        warn=self.guard.warn_once, on_scores=self._on_scores,
                                                        score_rows=self._score_rows))  # fmt: skip
            traced_since()
            self._step = step
            try:
                yield  # a forward that raised ends here: what ran or not says nothing then
            finally:
                self._step = None
            traced = traced_since()
            if traced:
                self.guard.warn_once(traced, TRACED if traced == "compile" else TRANSFORMED)
                self._compiled_forward = self._compiled_forward or (traced == "compile" and not eager)
            elif only is None and hooked:
                self._say_what_did_not_run(set(hooked), step.ran)

    def _say_what_did_not_run(self, hooked: set[str], ran: set[str | None]) -> None:
        """After a measured step: name, once, the watched modules whose hooks never ran in its forward."""
        if not ran:
            watched = ", ".join(sorted(hooked)[:6])
            self.guard.warn_once("unfired", f"geomon: none of the watched modules ({watched}) ran and no attention "
                                 "was seen during a measured step: the model was not called inside "
                                 "Monitor.step(...), or it ran inside a torch.compile'd function (where geomon's hooks "
                                 "do nothing); nothing read during the forward was measured on that step")  # fmt: skip
        elif self.head in hooked and self.head not in ran:
            self.guard.warn_once("head-unfired", f"geomon: the head {self.head!r} was not called through its forward "
                                 "on a measured step (a fused loss that reads its weight directly, such as a fused "
                                 "linear cross-entropy, or a head used on some steps only): its input's RankMe and "
                                 "neural collapse are not measured there")  # fmt: skip

    def _missing(self, module: str, probe: Probe) -> None:
        self.guard.warn_once(f"missing:{module}", f"geomon: module {module!r} is no longer in the model (removed "
                             f"or renamed after attach): {probe.pid} is skipped")  # fmt: skip

    def _on_attention(self, call: AttentionCall) -> None:
        if self._step is not None:
            self._step.ran.add("")
        self.guard.run(f"attention probe of {call.module!r}", self.attention_call, call)

    def _score_rows(self, n_q: int, n_k: int, heads: int) -> int:
        """Query rows read at a module's own softmax: ``query_rows`` as elsewhere; ``"auto"`` applies the same rule
        with the layer's width taken as its head count, the only width its scores show (so at least 128 rows, and
        0.24·H + 0.04·N beyond in self-attention: reading a row there costs elementwise passes over its keys, not the
        logits' dot products)."""
        return rows_to_measure(self.options.query_rows, n_q, n_k, heads)

    def _on_scores(self, call: ScoresCall) -> None:
        if self._step is not None:
            self._step.ran.add("")
        self.guard.run(f"attention probe of {call.module!r}", self.scores_call, call)

    # agreement and values ---------------------------------------------------------------------------------------
    def agree(self) -> None:
        """Make every rank hold the same probes with the same shapes (a collective; see the module docstring)."""
        local = {pid: probe.spec for pid, probe in self.probes.items() if not probe.agreed and probe.spec is not None}
        gathered = [local]
        if multi_process():
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, local)
        specs: dict[str, set[tuple[int, ...]]] = {}
        for rank_specs in gathered:
            for pid, spec in (rank_specs or {}).items():
                specs.setdefault(pid, set()).add(tuple(spec))
        # The budget counts agreed probes only: those are the same on every rank, while the probes still waiting
        # in this loop are known to some ranks alone (counting them, ranks would drop different probes).
        held = sum(probe.state_bytes() for probe in self if probe.agreed)
        for pid in sorted(specs):
            if len(specs[pid]) > 1:
                self._drop(pid, f"the ranks saw different shapes for it ({sorted(specs[pid])})")
                continue
            (spec,) = specs[pid]
            probe = self.probes.get(pid) or self.add(self._late_probe(pid))
            probe.spec, probe.agreed = spec, True
            if held + probe.state_bytes() > self.options.memory_budget_mib * MIB:
                self._drop(pid, f"its state ({probe.state_bytes() / MIB:.1f} MiB) would exceed memory_budget_mib="
                           f"{self.options.memory_budget_mib:g}")  # fmt: skip
                continue
            held += probe.state_bytes()
            probe.allocate(self.device)

    def _late_probe(self, pid: str) -> Probe:
        kind, name = pid.split(":", 1)
        if kind == AttentionProbe.kind:
            return AttentionProbe(name, None, backend=self.options.backend, query_rows=self.options.query_rows)
        if kind == EmbeddingProbe.kind:
            return EmbeddingProbe(name, None, min_rows=self.options.window_rows)
        raise ValueError(f"geomon: no probe of kind {kind!r} is created at run time")

    def _drop(self, pid: str, why: str) -> None:
        self.probes.pop(pid, None)
        self.dropped.add(pid)
        self.guard.warn_once(f"dropped:{pid}", f"geomon: probe {pid} is dropped: {why}")

    def compute(self, model: nn.Module, *, spectra: bool = False, measured: bool = True) -> Values:
        """Values of every probe (a collective: every rank calls it; probes run in id order on every rank).

        Only probes that every rank holds with a known shape take part; weight-based probes run only when a step
        was ``measured`` since the last compute."""
        self.agree()
        modules = plain_modules(model)
        self.device = next((p.device for p in model.parameters()), self.device)
        context = Context(modules, self.guard, spectra=spectra)
        out = Values()
        for probe in list(self):
            if not probe.agreed or (probe.weight_based and not measured):
                continue
            if probe.weight_based and probe.name not in modules:
                self._missing(probe.name, probe)
                continue
            probe.to(self.device)
            self.guard.run(f"{probe.pid}", probe.compute, context, out)
        return out

    # checkpoints ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {pid: {"spec": probe.spec, "state": probe.state_dict()} for pid, probe in self.probes.items()
                if probe.agreed}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for pid, saved in state.items():
            spec = None if saved["spec"] is None else tuple(saved["spec"])
            probe = self.probes.get(pid)
            if probe is None:
                if pid.split(":", 1)[0] not in (AttentionProbe.kind, EmbeddingProbe.kind):
                    self.guard.warn_once(f"restore:{pid}", f"geomon: the checkpoint's probe {pid} is not in this "
                                         "model's plan; its state is not restored")  # fmt: skip
                    continue
                probe = self.add(self._late_probe(pid))
            if probe.spec is not None and spec != probe.spec:
                raise ValueError(f"the checkpoint's probe {pid} has shape {spec}, the model's plan {probe.spec}")
            probe.spec, probe.agreed = spec, spec is not None
            probe.allocate(self.device)
            probe.load_state_dict(saved["state"])
