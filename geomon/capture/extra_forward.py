"""An extra forward pass that measures without touching training: for models whose own forward geomon cannot see
into (``torch.compile``: forward hooks and the attention interception do not run inside a compiled graph, and adding
them would change what is compiled).

:func:`extra_forward` is the context such a pass runs in:

- ``torch.no_grad()``: no graph, no gradients, nothing for the optimizer;
- compiled code runs eagerly (``torch.compiler.set_stance("force_eager")``, torch >= 2.6), so the hooks fire and the
  attention call is intercepted; nothing is compiled or recompiled, and the compiled training graph stays as it was;
- the random-number state of the CPU and of the model's accelerator is saved and restored (``torch.random.fork_rng``),
  and so are Python's ``random`` and NumPy's global generators (a forward may draw from them: wav2vec2's SpecAugment
  masks, BigBird's random blocks): dropout in the extra pass draws, the training's next draws are those it would have
  made without it;
- the pass runs on copies of the model's buffers, and the model's own buffer tensors are put back after it: what it
  writes into a buffer (a ``BatchNorm``'s running statistics and batch counter, σReparam's power-iteration vector,
  any buffer a forward updates in place or replaces) is dropped, and the training's buffers are not written at all.
  Python attributes a forward sets, tensors a module keeps outside its buffers, parameters a forward changes in place
  and a module's own generators are not protected; a buffer shared by two modules becomes two copies in the pass.

Cost: one forward pass without autograd, on every step it measures, plus a copy of the model's buffers.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn


def can_force_eager() -> bool:
    """Whether this torch can run compiled code eagerly on request (``torch.compiler.set_stance``, torch >= 2.6)."""
    return callable(getattr(torch.compiler, "set_stance", None))


def _accelerator(model: nn.Module) -> tuple[str, list[int]] | None:
    """The non-CPU device type of the model's parameters and buffers with its device indices, if any."""
    devices = {t.device for t in (*model.parameters(), *model.buffers()) if t.device.type not in ("cpu", "meta")}
    if not devices:
        return None
    kind = sorted(d.type for d in devices)[0]
    indices = sorted({d.index if d.index is not None else 0 for d in devices if d.type == kind})
    return kind, indices


@contextmanager
def _host_rng_kept() -> Iterator[None]:
    """Put Python's ``random`` and NumPy's global generator back as they were after the block (a forward may draw
    from them, out of ``torch.random.fork_rng``'s reach). NumPy is not imported for this: if it is not loaded yet,
    nothing in the block's caller drew from it."""
    python_state = random.getstate()
    numpy = sys.modules.get("numpy")
    numpy_state = numpy.random.get_state() if numpy is not None else None
    try:
        yield
    finally:
        random.setstate(python_state)
        if numpy is not None:
            numpy.random.set_state(numpy_state)


@contextmanager
def _buffers_copied(model: nn.Module) -> Iterator[None]:
    """Run the block on copies of the model's buffers, then put the training's own tensors back: whatever the block
    writes into a buffer (in place or by replacing it) never reaches them, and they are not written at all (no
    version bump for autograd, no host sync to find out what changed)."""
    owned = [(module, name, buffer) for module in model.modules() for name, buffer in module._buffers.items()]
    with torch.no_grad():
        for module, name, buffer in owned:
            if buffer is not None:
                module._buffers[name] = buffer.clone()
    try:
        yield
    finally:
        for module, name, buffer in owned:
            module._buffers[name] = buffer


@contextmanager
def extra_forward(model: nn.Module) -> Iterator[None]:
    """The context of a measuring forward pass over ``model`` that leaves training as it was (see the module)."""
    if not can_force_eager():
        raise RuntimeError(f"an extra measuring forward needs torch >= 2.6 (torch.compiler.set_stance), this is "
                           f"torch {torch.__version__}")  # fmt: skip
    accelerator = _accelerator(model)
    with ExitStack() as stack:
        if accelerator is None:
            stack.enter_context(torch.random.fork_rng(devices=[]))
        else:
            kind, indices = accelerator
            stack.enter_context(torch.random.fork_rng(devices=indices, device_type=kind))
        stack.enter_context(_host_rng_kept())
        stack.enter_context(_buffers_copied(model))
        stack.enter_context(torch.no_grad())
        stack.enter_context(torch.compiler.set_stance("force_eager"))
        yield
