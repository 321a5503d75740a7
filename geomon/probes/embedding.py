"""RankMe and alpha-ReQ of one stream of embeddings, over windows of enough rows."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from geomon import keys
from geomon.capture._session import in_backward
from geomon.functional._embedding import _covariance_eigenvalues, _singular_values
from geomon.functional.alpha_req import _alpha_req_compute
from geomon.functional.rankme import _rankme_compute
from geomon.metrics import RankMe
from geomon.probes._sync import multi_process, synced_sum
from geomon.probes.base import FLOAT64, Context, Probe, Step, Values, steps_to_fill

Source = Literal["output", "input"]

#: The fields of a mapping output (a dict, a Hugging Face ``ModelOutput``) read as its embeddings, in this order.
HIDDEN_FIELDS = ("last_hidden_state", "hidden_states")


def embedding_tensor(found: Any) -> Tensor | None:
    """The embeddings in a module's output (or input): the tensor itself, a tuple's or list's first element, or a
    mapping's :data:`HIDDEN_FIELDS` entry (a tensor); ``None`` when there is none. A nested tensor (the fast path of
    ``nn.TransformerEncoder`` drops padded tokens into one) gives the rows of its components: the real tokens.

    Example:
        >>> import torch
        >>> embedding_tensor({"logits": torch.zeros(2, 5), "last_hidden_state": torch.ones(2, 3)}).shape
        torch.Size([2, 3])
        >>> embedding_tensor([torch.zeros(4, 2), None]).shape, embedding_tensor({"loss": torch.zeros(())})
        (torch.Size([4, 2]), None)
    """
    found = _found_tensor(found)
    if isinstance(found, Tensor) and found.is_nested:  # nn.TransformerEncoder's fast path: the tokens without padding
        parts = [part.reshape(-1, part.shape[-1]) for part in found.detach().unbind()]
        return torch.cat(parts) if parts else None
    return found if isinstance(found, Tensor) else None


def _found_tensor(found: Any) -> Any:
    """The tensor :func:`embedding_tensor` reads in ``found`` (nested or not), or what stands in its place."""
    if isinstance(found, (tuple, list)):
        return found[0] if found else None
    if isinstance(found, Mapping):
        return next((found[f] for f in HIDDEN_FIELDS if isinstance(found.get(f), Tensor)), None)
    return found


class EmbeddingProbe(Probe):
    """Accumulates rows ``[..., D]`` until the window holds ``min_rows`` over all processes, then logs
    ``geomon/rankme/<name>`` (uncentred RankMe), ``geomon/rankme_cov/<name>`` (RankMe of the centred covariance
    eigenvalues, the curve the "Tracing the Representation Geometry" study reads its phases from) and, where
    ``D > 100``, ``geomon/alpha_req/<name>``, and starts a new window.

    RankMe is biased low on few rows (METRICS.md §1), hence the default window of ``4 x D`` rows. A probe fed by a
    hook fills its window from the steps just before each compute, not only from the measured ones: when one step's
    rows (``R`` per process, read off the shapes of the measured step) are fewer than the window needs, the hook also
    runs on the ``ceil(min_rows / (R · processes)) - 1`` optimizer steps before each measured step, every step when
    that is more than the period (:meth:`lead_steps`; the Gram update is the only work, on the device). Every value
    comes from one accumulated Gram and row sum (:class:`~geomon.metrics.RankMe`'s state), reduced once per window;
    the covariance's eigenvalues serve both the centred RankMe and alpha-ReQ.

    Padding is left out: when the step has a token mask (``[B, N]``, see :meth:`geomon.Monitor.step`) and the hooked
    tensor's leading dimensions are exactly ``[B, N]``, the rows of padding positions are zeroed before the Gram and
    the sum and are not counted in the window's rows (a bool row mask on the device: no indexing, no host sync), so
    a window closes on real tokens. A tensor of another leading shape cannot be aligned with the mask: its rows are
    all measured, and a warning naming the probe says so once. A nested tensor's rows are its real tokens already.
    The fill schedule (:meth:`lead_steps`) plans on a step's rows read off the shapes on the host (counting the real
    tokens there would need a host sync) times the share of real rows in the last window that closed
    (:attr:`real_share`, from the count compute reduces anyway); the first window, before any share is known,
    takes about ``1 / (1 - p)`` times the periods planned at a share ``p`` of padding (it keeps accumulating until
    it holds ``min_rows`` real rows). A step whose token mask describes one probe's rows alone
    (``Step.token_mask_rows``: a sequence-to-sequence model's decoder mask, the head's input) leaves the others
    unmasked, said once each.

    Args:
        name: the probe's name (a module's name, ``<head>.input``, or a name given to ``Monitor.observe``).
        features: ``D`` (``None``: read off the first rows; agreed across ranks at compute).
        module: the module whose ``source`` (its output, or its first input) is captured; ``None`` for rows handed
            over with :meth:`update`.
        min_rows: rows per window (default ``4 x D``).
    """

    kind = "embedding"

    def __init__(
        self, name: str, features: int | None, *, module: str | None = None, source: Source = "output",
        min_rows: int | None = None,
    ) -> None:  # fmt: skip
        super().__init__(name, None if features is None else (features,))
        self._module, self.source, self._min_rows = module, source, min_rows
        self.rankme: RankMe | None = None
        self.rows_per_step: int | None = None  #: rows of the latest hooked call (a host-side int, from the shape)
        self.window_positions = 0  #: rows handed to the open window on this process, padding included (host int)
        #: the share of real (unpadded) rows in the last window that closed, read at its close: the fill schedule
        #: plans on ``rows_per_step`` times it (1 without padding)
        self.real_share = 1.0

    @property
    def module(self) -> str | None:
        return self._module

    @property
    def num_features(self) -> int | None:
        return None if self.spec is None else self.spec[0]

    @property
    def min_rows(self) -> int:
        assert self.spec is not None
        return 4 * self.spec[0] if self._min_rows is None else self._min_rows

    def lead_steps(self, world_size: int) -> int:
        if self._module is None or self.spec is None:
            return 1
        rows = None if not self.rows_per_step else max(1, int(self.rows_per_step * self.real_share))
        return steps_to_fill(self.min_rows, rows, world_size)

    def keys(self) -> list[str]:
        with_alpha = self.spec is None or self.spec[0] > 100  # alpha-ReQ's default fit runs over eigenvalues 11..100
        rank = [keys.key(keys.RANKME, self.name), keys.key(keys.RANKME_COV, self.name)]
        return rank + ([keys.key(keys.ALPHA_REQ, self.name)] if with_alpha else [])

    def state_bytes(self) -> int:
        return 0 if self.spec is None else (1 + self.spec[0] + self.spec[0] ** 2 + 3) * FLOAT64  # + 3 lean defaults

    def allocate(self, device: torch.device) -> None:
        if self.rankme is None and self.spec is not None:
            self.rankme = RankMe(self.spec[0], min_samples=1).to(device)

    def to(self, device: torch.device) -> None:
        if self.rankme is not None:
            self.rankme.to(device)

    def update(self, tensor: Tensor, row_mask: Tensor | None = None) -> bool:
        """Add rows ``[..., D]`` (with ``row_mask``, bool, one flag per row: only those flagged); ``False`` (nothing
        added) when ``D`` differs from the spec."""
        rows = tensor.detach().reshape(-1, tensor.shape[-1])
        if self.spec is None:
            self.spec = (rows.shape[1],)
        if self.spec != (rows.shape[1],):
            return False
        self.allocate(rows.device)
        assert self.rankme is not None
        self.rankme.update(rows, row_mask)
        return True

    def arm(self, module: nn.Module, step: Step) -> list[RemovableHandle]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if in_backward():  # a checkpointed block's recomputation: seen once
                return
            step.ran.add(self.module)
            found = inputs[0] if self.source == "input" and inputs else output
            tensor = embedding_tensor(found)
            if tensor is not None:
                nested = getattr(_found_tensor(found), "is_nested", False)  # its rows are the real tokens already
                step.guard.run(f"embedding capture of {self.name!r}", self._update_checked, tensor, step, nested)
            else:
                step.guard.warn_once(f"no-tensor:{self.name}", f"geomon: module {self.name!r} returned "
                                     f"{type(found).__name__}, in which geomon finds no [..., D] tensor (it reads a "
                                     "tensor, the first element of a tuple or list, or a mapping's / model output's "
                                     f"{' or '.join(map(repr, HIDDEN_FIELDS))}); probe {self.name!r} measures "
                                     "nothing. Name a submodule that returns the embeddings, or hand them to "
                                     "Monitor.observe")  # fmt: skip

        return [module.register_forward_hook(hook, always_call=True)]

    def _update_checked(self, tensor: Tensor, step: Step, nested: bool = False) -> None:
        self.rows_per_step = tensor.numel() // max(1, tensor.shape[-1]) if tensor.ndim else None
        row_mask = None if step.token_mask is None or nested else self._row_mask(tensor, step)
        if self.update(tensor, row_mask):
            self.window_positions += self.rows_per_step or 0
        else:
            step.guard.warn_once(f"features:{self.name}", f"geomon: probe {self.name!r} has {self.spec[0]} features "
                                 f"but got rows of shape {tuple(tensor.shape)}; they are skipped")  # fmt: skip

    def _row_mask(self, tensor: Tensor, step: Step) -> Tensor | None:
        """The step's token mask as one flag per row of ``tensor`` when its leading dimensions are the mask's
        ``[B, N]``; else ``None`` (every row counts): without a word for one row per sequence (``[B, D]``, a pooled
        embedding, which has no padding row), said once for this probe otherwise."""
        mask = step.token_mask
        assert mask is not None
        if step.token_mask_rows is not None and step.token_mask_rows != self.name:
            step.guard.warn_once(f"token-mask:{self.name}", f"geomon: probe {self.name!r} reads rows that the token "
                                 "mask does not describe (a sequence-to-sequence model's decoder mask describes the "
                                 f"rows of {step.token_mask_rows!r} alone): all of its rows are measured, padding "
                                 "included")  # fmt: skip
            return None
        if tensor.ndim >= 2 and tuple(tensor.shape[:-1]) == tuple(mask.shape):
            return step.row_mask(tensor.device)
        if tensor.ndim == 2 and tensor.shape[0] == mask.shape[0]:
            return None  # one row per sequence (a pooled embedding): no row of it is padding
        step.guard.warn_once(f"token-mask:{self.name}", f"geomon: probe {self.name!r} reads rows of shape "
                             f"{tuple(tensor.shape)}, whose leading dimensions are not the token mask's [B, N] = "
                             f"{list(mask.shape)}, so the mask cannot say which of them are padding: all of its rows "
                             "are measured, padding included. Give a mask aligned with this module's rows (token_mask "
                             "/ token_mask_fn; a sequence-to-sequence model's decoder rows need the "
                             "decoder_attention_mask), or none")  # fmt: skip
        return None

    def compute(self, context: Context, out: Values) -> None:
        metric = self.rankme
        assert metric is not None and self.spec is not None
        real = float(synced_sum(metric.n))  # every rank decides from the same reduced count
        if real < self.min_rows:
            return
        if self.window_positions:  # the real rows' share, for the fill schedule (other ranks taken as this one)
            world = dist.get_world_size() if multi_process() else 1
            self.real_share = min(1.0, real / (self.window_positions * world))
        self.window_positions = 0
        name = keys.key(keys.RANKME, self.name)
        with metric.sync_context():  # one all-reduce of the window's sums serves every value below
            stats = metric._stats()
            # Each eigenproblem is solved once; non-finite sums (which eigvalsh cannot take) and a 1-row window
            # (no covariance) are left to the compute functions, which warn and return NaN.
            finite = bool(stats.gram.isfinite().all()) and bool(stats.total.isfinite().all())
            sigma = _singular_values(stats) if finite else None
            lam = _covariance_eigenvalues(stats) if finite and float(stats.n) >= 2 else None
            out.scalars[name] = _rankme_compute(stats, eps=metric.eps, min_samples=1, spectrum=sigma)
            out.scalars[keys.key(keys.RANKME_COV, self.name)] = _rankme_compute(
                stats, eps=metric.eps, centered=True, min_samples=1, spectrum=lam
            )
            if self.spec[0] > 100:
                out.scalars[keys.key(keys.ALPHA_REQ, self.name)] = _alpha_req_compute(stats, eigenvalues=lam)[0]
            if context.spectra and sigma is not None:  # singular values of the window's rows, for the spectrum plot
                out.spectra[name] = sigma
        metric.reset()

    def state_dict(self) -> dict[str, Any]:
        if self.rankme is None:
            return {}
        return {"min_rows": self._min_rows, "rankme": self.rankme.state_dict(), "rows_per_step": self.rows_per_step,
                "real_share": self.real_share, "window_positions": self.window_positions}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state and self.rankme is not None:
            self.rankme.load_state_dict(state["rankme"])
            self.rows_per_step = state.get("rows_per_step")  # a resumed run fills on the steps the whole run would
            self.real_share = state.get("real_share", 1.0)
            self.window_positions = state.get("window_positions", 0)
