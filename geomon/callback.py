"""``GeomonCallback``: the thin Lightning adapter over :class:`geomon.Monitor` (first version).

One class serves both ``lightning.pytorch`` and ``pytorch_lightning`` Trainers: it derives from the ``Callback``
class of each package that is installed, so either Trainer accepts it and users import it the same way.

Logged keys (scalars, written to every logger of the trainer at the global step whose forward pass was measured,
and put into ``trainer.callback_metrics`` so that ``EarlyStopping(monitor="geomon/...")`` and ``ModelCheckpoint``
see them; ``pl_module.log`` is not used because Lightning would repeat a callback's value on every later step):

- ``geomon/attention/entropy/<module>``: mean entropy (nats) over batch, heads and valid query rows;
- ``geomon/attention/entropy_normalized/<module>``: mean of ``H / log n`` (rows with at least 2 keys);
- ``geomon/attention/max_logit/<module>``: largest attention logit;
- ``geomon/rankme/<module>``, ``geomon/alpha_req/<module>``: for the ``embedding_modules`` (when a window of
  ``4 x D`` rows is full);
- ``geomon/spectral/sigma/<module>``: σ(W) of the ``spectral_modules``' weights (warm-started power iteration).

Measurement happens on the first micro-batch of every ``every_n_steps``-th optimizer step (gradient accumulation
gives one measurement per optimizer step); other steps do no work and no host-device sync. Under DDP ``compute``
runs on every rank (it is a collective) and the values, identical on all ranks, are logged.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

from geomon.functional._dispatch import Backend
from geomon.monitor import Monitor


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


class GeomonCallback(*_callback_bases()):  # type: ignore[misc]
    """Watch a LightningModule's geometry during ``fit``.

    Args:
        every_n_steps: measure every this many optimizer steps.
        attention: measure every ``F.scaled_dot_product_attention`` call inside the module.
        embedding_modules: ``fnmatch`` patterns of modules whose outputs feed RankMe / alpha-ReQ.
        spectral_modules: ``fnmatch`` patterns of modules with a 2-D weight whose σ(W) is logged.
        query_rows: measure at most this many evenly spaced query rows per attention call.
        backend: ``"auto"`` (Triton kernels on CUDA), ``"torch"`` or ``"triton"``.
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
        self.monitor = Monitor(
            every_n_steps=every_n_steps,
            attention=attention,
            embedding_modules=embedding_modules,
            spectral_modules=spectral_modules,
            query_rows=query_rows,
            backend=backend,
            strict=strict,
        )
        self._armed: Any = None
        self._measured_step = 0
        self._pending_state: dict[str, Any] | None = None

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.monitor.attach(pl_module)
        if self._pending_state is not None:
            self.monitor.load_state_dict(self._pending_state)
            self._pending_state = None

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        first_micro_batch = batch_idx % max(1, trainer.accumulate_grad_batches) == 0
        if first_micro_batch and self.monitor.is_scheduled(trainer.global_step):
            self._armed = self.monitor.step(trainer.global_step)
            self._armed.__enter__()
            self._measured_step = trainer.global_step

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._armed is None:
            return
        self._disarm()
        values = {key: value.float() for key, value in self.monitor.compute().items()}
        if not values:
            return
        trainer.callback_metrics.update(values)
        scalars = {key: float(value) for key, value in values.items()}  # the logging step: a sync is fine here
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=self._measured_step)

    def _disarm(self) -> None:
        armed, self._armed = self._armed, None
        if armed is not None:
            armed.__exit__(None, None, None)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._disarm()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._disarm()
        self.monitor.detach()

    def state_dict(self) -> dict[str, Any]:
        return self.monitor.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_state = state_dict  # applied at setup, once the module is attached
