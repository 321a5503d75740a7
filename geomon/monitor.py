"""The framework-neutral core: watch a model's forward passes on a schedule, in any training loop.

A first version: attention entropy / max logit of every SDPA call inside the model, and RankMe / alpha-ReQ of the
outputs of modules chosen by name pattern. ``with monitor.step(global_step): loss = model(x)`` arms the capture
only on scheduled steps (off-schedule steps do nothing at all); ``monitor.compute()`` on those steps returns the
values under geomon's key scheme and starts the next window. Embedding metrics keep accumulating rows across
measured steps until they hold ``4 x D`` (RankMe's small-sample bias), then report and reset.

Example:
    >>> import torch
    >>> from geomon._tiny_gpt import TinyGPT
    >>> model = TinyGPT(vocab_size=30, d_model=32, context=16)
    >>> monitor = Monitor(every_n_steps=2, embedding_modules=["ln_f"]).attach(model)
    >>> for step in range(3):
    ...     with monitor.step(step):
    ...         logits = model(torch.randint(0, 30, (8, 16)))
    ...     values = monitor.compute() if monitor.is_scheduled(step) else {}
    >>> "geomon/attention/entropy/blocks.1.attn" in values, "geomon/rankme/ln_f" in values
    (True, True)
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from geomon.capture import AttentionCall, capture_sdpa
from geomon.functional import GeomonWarning
from geomon.functional._dispatch import BACKENDS, Backend
from geomon.metrics import AlphaReQ, AttentionEntropy, RankMe, SpectralNorm


class Monitor:
    """Schedules capture on a model and turns what it captures into logged values.

    Args:
        every_n_steps: measure on steps where ``global_step % every_n_steps == 0``.
        attention: measure every ``F.scaled_dot_product_attention`` call inside the model.
        embedding_modules: ``fnmatch`` patterns over ``named_modules()``; each match's output (``[..., D]``) feeds
            RankMe and alpha-ReQ (alpha only where ``D > 100``).
        spectral_modules: ``fnmatch`` patterns of modules with a 2-D ``weight`` (e.g. ``"*.qkv"``); each gets its
            σ(W) by warm-started power iteration on every :meth:`compute` (``geomon/spectral/sigma/<module>``).
        query_rows: if set, measure at most this many evenly spaced query rows per attention call.
        backend: kernels or torch for attention entropy (see :mod:`geomon.functional`).
        strict: raise probe errors instead of warning (for tests).
    """

    def __init__(
        self,
        *,
        every_n_steps: int = 50,
        attention: bool = True,
        embedding_modules: Sequence[str] = (),
        spectral_modules: Sequence[str] = (),
        query_rows: int | None = None,
        backend: Backend = "auto",
        strict: bool = False,
    ) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be a positive integer, got {every_n_steps!r}")
        if query_rows is not None and (not isinstance(query_rows, int) or query_rows < 1):
            raise ValueError(f"query_rows must be a positive integer or None, got {query_rows!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.every_n_steps, self.attention, self.query_rows = every_n_steps, attention, query_rows
        self.patterns, self.backend, self.strict = list(embedding_modules), backend, strict
        self.spectral_patterns = list(spectral_modules)
        self.model: nn.Module | None = None
        self.embedding_names: list[str] = []
        self.spectral_metrics: dict[str, SpectralNorm] = {}
        self.attention_metrics: dict[str, AttentionEntropy] = {}
        self.embedding_metrics: dict[str, tuple[RankMe, AlphaReQ | None]] = {}

    def attach(self, model: nn.Module) -> Monitor:
        """Resolve the module patterns on ``model``; a pattern that matches nothing fails here, listing names."""
        modules = {name: module for name, module in model.named_modules() if name}
        self.embedding_names = _resolve(self.patterns, list(modules), "embedding_modules")
        weighted = [name for name, m in modules.items() if isinstance(getattr(m, "weight", None), Tensor)
                    and m.weight.ndim == 2]  # fmt: skip
        spectral = _resolve(self.spectral_patterns, weighted, "spectral_modules (modules with a 2-D weight)")
        self.spectral_metrics = {name: self.spectral_metrics.get(name, SpectralNorm()) for name in spectral}
        self.model = model
        return self

    def detach(self) -> None:
        """Forget the model (no hook outlives a :meth:`step` block anyway)."""
        self.model = None

    def is_scheduled(self, global_step: int) -> bool:
        return global_step % self.every_n_steps == 0

    def step(self, global_step: int) -> Any:
        """Context manager around the forward pass of ``global_step``; a no-op off schedule."""
        if self.model is None:
            raise RuntimeError("Monitor.step() before attach(model)")
        return self._armed() if self.is_scheduled(global_step) else nullcontext()

    @contextmanager
    def _armed(self) -> Iterator[None]:
        assert self.model is not None
        modules = dict(self.model.named_modules())
        with ExitStack() as stack:
            for name in self.embedding_names:
                handle = modules[name].register_forward_hook(self._embedding_hook(name), always_call=True)
                stack.callback(handle.remove)
            if self.attention:
                stack.enter_context(capture_sdpa(self.model, self._on_attention, strict=self.strict))
            yield

    def _guard(self, what: str, fn: Any, *args: Any) -> None:
        try:
            with torch.no_grad():
                fn(*args)
        except Exception as error:  # a probe must never break training
            if self.strict:
                raise
            warnings.warn(f"geomon: {what} failed and was skipped: {error!r}", stacklevel=3)

    def _on_attention(self, call: AttentionCall) -> None:
        metric = self.attention_metrics.get(call.module)
        if metric is None:
            metric = self.attention_metrics[call.module] = AttentionEntropy(call.q.shape[1], backend=self.backend)
            metric.to(call.q.device)
        index = None
        n_q = call.q.shape[-2]
        if self.query_rows is not None and n_q > self.query_rows:
            index = torch.linspace(0, n_q - 1, self.query_rows, device=call.q.device).round().long()
        metric.update(call.q, call.k, scale=call.scale, is_causal=call.is_causal, attn_mask=call.attn_mask,
                      query_index=index)  # fmt: skip

    def _embedding_hook(self, name: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            tensor = output[0] if isinstance(output, tuple) else output
            if isinstance(tensor, Tensor):
                self._guard(f"embedding capture of {name!r}", self._on_embedding, name, tensor)

        return hook

    def _on_embedding(self, name: str, output: Tensor) -> None:
        rows = output.detach().reshape(-1, output.shape[-1])
        if name not in self.embedding_metrics:
            d = rows.shape[1]
            alpha = AlphaReQ(d).to(rows.device) if d > 100 else None
            self.embedding_metrics[name] = (RankMe(d).to(rows.device), alpha)
        for metric in self.embedding_metrics[name]:
            if metric is not None:
                metric.update(rows)

    def compute(self) -> dict[str, Tensor]:
        """Values of the finished windows (a collective under DDP: call it on every rank), keyed by geomon's scheme."""
        values: dict[str, Tensor] = {}
        for name, metric in self.attention_metrics.items():
            result = metric.compute()
            values[f"geomon/attention/entropy/{name}"] = result["entropy"]
            values[f"geomon/attention/entropy_normalized/{name}"] = result["entropy_normalized"]
            values[f"geomon/attention/max_logit/{name}"] = result["max_logit"]
            metric.reset()
        modules = dict(self.model.named_modules()) if self.model is not None else {}
        for name, metric in self.spectral_metrics.items():
            weight = modules[name].weight.detach()
            metric.to(weight.device).update(weight)
            values[f"geomon/spectral/sigma/{name}"] = metric.compute()
        for name, (rankme, alpha) in self.embedding_metrics.items():
            # every rank decides from the synchronised row count, so all ranks take the same branch
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", GeomonWarning)
                value = rankme.compute()
            if any("needs at least" in str(w.message) for w in caught):
                continue  # keep accumulating rows: the window is not full yet
            for w in caught:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            values[f"geomon/rankme/{name}"] = value
            rankme.reset()
            if alpha is not None:
                values[f"geomon/alpha_req/{name}"] = alpha.compute()
                alpha.reset()
        return values

    def state_dict(self) -> dict[str, Any]:
        """Open windows, for checkpoints: a resumed run continues them."""
        return {
            "spectral": {name: m.state_dict() for name, m in self.spectral_metrics.items()},
            "attention": {name: (m.num_heads, m.state_dict()) for name, m in self.attention_metrics.items()},
            "embeddings": {
                name: (r.num_features, r.state_dict(), None if a is None else a.state_dict())
                for name, (r, a) in self.embedding_metrics.items()
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, metric_state in state.get("spectral", {}).items():
            metric = self.spectral_metrics[name] = SpectralNorm()
            metric.load_state_dict(metric_state)
        for name, (heads, metric_state) in state["attention"].items():
            metric = self.attention_metrics[name] = AttentionEntropy(heads, backend=self.backend)
            metric.load_state_dict(metric_state)
        for name, (d, rankme_state, alpha_state) in state["embeddings"].items():
            rankme, alpha = RankMe(d), (AlphaReQ(d) if alpha_state is not None else None)
            rankme.load_state_dict(rankme_state)
            if alpha is not None:
                alpha.load_state_dict(alpha_state)
            self.embedding_metrics[name] = (rankme, alpha)


def _resolve(patterns: Sequence[str], names: list[str], what: str) -> list[str]:
    """The names matching each ``fnmatch`` pattern, in order; a pattern that matches nothing fails, listing names."""
    resolved: list[str] = []
    for pattern in patterns:
        matches = [name for name in names if fnmatch.fnmatchcase(name, pattern)]
        if not matches:
            shown = ", ".join(names[:40]) + (", ..." if len(names) > 40 else "")
            raise ValueError(f"{what} pattern {pattern!r} matches no module; the candidates are: {shown}")
        resolved += [name for name in matches if name not in resolved]
    return resolved
