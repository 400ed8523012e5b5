"""The DirectPred predictor head: ``W_p`` set in closed form from the running statistics of its input."""

from __future__ import annotations

import warnings
from typing import Any, Dict, Optional, Union

import torch
from torch import Tensor, nn

from . import diagnostics
from .calls import CHECKPOINT_ERROR, WeightSnapshots, autocast_disabled, in_reentrant_checkpoint, inside_backward, linear
from .options import HeadOptions, OptionAttributes, head_options
from .refresh import Refresher
from .schedule import CounterMirror, StepSchedule
from .state import migrate_state_dict
from .statistics import RunningStats
from .streams import SideStream

__all__ = ["DirectPredHead", "CallsPerUpdate"]

CallsPerUpdate = Union[int, str]


class DirectPredHead(OptionAttributes, nn.Module):
    """Predictor set in closed form from the correlation of its input (DirectPred and its family).

    Non-contrastive SSL (BYOL, SimSiam) avoids collapse because the predictor ``W_p`` aligns
    with the eigenspace of the correlation ``F = E[z z^T]`` of its input [0]. DirectPred sets
    ``W_p = U diag(sqrt(s / max s) + eps) U^T`` from an EMA ``F_hat = U diag(s) U^T`` instead
    of learning it; ``variant`` picks another member of the family
    (:data:`directpred_plugin.VARIANTS`). Each training-mode call returns ``z @ W_p^T`` and
    pools the batch's moments; each training step folds its pool into ``F_hat`` and every
    ``freq``-th step refreshes ``W_p``. ``calls_per_update="auto"`` makes one update per step
    (the calls between two backward passes, every view of the step). The options, the
    training conditions and the pipeline are described in the documentation.

    - [0]: Tian, Chen & Ganguli, "Understanding self-supervised learning dynamics without
      contrastive pairs", ICML 2021, https://arxiv.org/abs/2102.06810

    Examples:
        >>> predictor = DirectPredHead(256, calls_per_update="auto")  # BYOL's 256-4096-256 MLP
        >>> p0, p1 = predictor(projector(backbone(x0))), predictor(projector(backbone(x1)))
    """

    _version = 4
    weight: Tensor

    def __init__(self, dim: int, *, rho: float = 0.3, eps: float = 0.01, freq: int = 1,
                 variant: str = "directpred", trainable: bool = False, center: bool = False,
                 calls_per_update: CallsPerUpdate = 1, stats_dtype: torch.dtype = torch.float32,
                 sync_dist: bool = True, process_group: Optional[Any] = None, refresh: str = "auto",
                 refresh_options: Optional[Dict[str, Any]] = None, alpha: Optional[float] = None,
                 eps_inside: bool = False, ridge: float = 0.0, weight_momentum: float = 0.0) -> None:
        super().__init__()
        self.options: HeadOptions = head_options(
            dim, rho=rho, eps=eps, freq=freq, variant=variant, trainable=trainable, center=center,
            calls_per_update=calls_per_update, stats_dtype=stats_dtype, sync_dist=sync_dist,
            process_group=process_group, refresh=refresh, refresh_options=refresh_options, alpha=alpha,
            eps_inside=eps_inside, ridge=ridge, weight_momentum=weight_momentum)
        o = self.options
        self.stats = RunningStats(o.dim, rho=o.rho, center=o.center, stats_dtype=o.stats_dtype,
                                  sync_dist=o.sync_dist, process_group=o.process_group)
        self.refresher = Refresher(o)
        if o.trainable:  # the optimizer's, so it follows the module's dtype
            self.weight = nn.Parameter(torch.eye(o.dim))
        else:
            self.register_buffer("weight", torch.eye(o.dim, dtype=o.stats_dtype))
        self.schedule = StepSchedule(o.freq, o.calls_per_update)
        self.mirror = CounterMirror()
        self.snapshots = WeightSnapshots()  # within a step only, never saved
        self.side_stream = SideStream()  # where the step's end runs when a backward pass triggers it
        self._warned: set = set()

    # ------------------------------------------------------------------ forward
    def forward(self, z: Tensor) -> Tensor:
        self._check_input(z)
        if self.training and torch.is_grad_enabled():
            return self._training_call(z)
        if self.training:  # training mode without autograd: where reentrant checkpointing runs
            self.snapshots.untracked += 1
            if in_reentrant_checkpoint():
                raise RuntimeError(CHECKPOINT_ERROR.format("reentrant checkpointing runs the forward under "
                                                           "no_grad, where the head collects no statistics"))
        return linear(z, self.weight if self.trainable else self.weight.detach().clone())

    @torch.compiler.disable
    def _training_call(self, z: Tensor) -> Tensor:
        """One training-mode call, eager under torch.compile: the schedule is decided on the host."""
        if inside_backward():  # activation checkpointing recomputes the forward
            return linear(z, self.snapshots.for_recomputation(self.weight, self.trainable, z.dtype))
        self._begin_call()
        weight = self.snapshots.for_call(self.weight, self.trainable, z.dtype)
        if not (z.requires_grad or self.trainable) and self.options.auto_steps:
            # No backward pass can reach this call, so it is a step of its own.
            self._close(lambda: self.stats.fold_batch(z), in_step=False, empties_pool=False)
            return linear(z, weight)
        with torch.no_grad():
            self.stats.collect(z, opens_pool=self.schedule.calls == 0)
        if self.schedule.add_call():
            self._close(self.stats.fold, in_step=True)
        out = linear(z, weight)
        for tensor in (z, out):  # whichever a backward pass reaches first ends the step
            if tensor.requires_grad:
                tensor.register_hook(self._mark_backward)
        return out

    def _mark_backward(self, grad: Tensor) -> None:
        # The step's statistics are complete once its backward pass reaches the head: close it
        # here, beside the rest of the backward pass, not at the next step's first call.
        if self.schedule.mark_backward():
            self.side_stream.run(self.weight.device, lambda: self._close(self.stats.fold, in_step=True))

    @torch.no_grad()
    def update(self, z: Tensor) -> None:
        """Add a batch to the statistics without computing an output.

        With ``"auto"`` it is an update of its own; with an integer ``calls_per_update`` it
        counts as one call. Collective under DDP: every rank must call it equally often.
        """
        self._check_input(z)
        self._begin_call()
        if self.options.auto_steps:
            self._close(lambda: self.stats.fold_batch(z), in_step=False, empties_pool=False)
            return
        self.stats.collect(z, opens_pool=self.schedule.calls == 0)
        if self.schedule.add_call():
            self._close(self.stats.fold, in_step=False)

    def _begin_call(self) -> None:
        if not self.schedule.begin_call():
            return
        self.snapshots.new_step()  # a backward pass ran: a new step
        if self.schedule.pool_ended():  # a step saved after its backward pass by an older release
            self._close(self.stats.fold, in_step=False)
        if self.schedule.take_deferred():
            self._refresh()

    def _close(self, fold: Any, *, in_step: bool, empties_pool: bool = True) -> None:
        """End a step: fold its statistics, then refresh on schedule."""
        with torch.no_grad(), autocast_disabled(self.weight.device.type):
            grown = self.mirror.receive()
            if grown[0] > 0:
                self._warn_once("nonfinite", _SKIP_WARNING)
            if grown[1] > 0:
                self.refresher.rejection_learned()
                self._warn_once("refresh", _REJECTION_WARNING)
            fold()
            if self.schedule.close(empties_pool=empties_pool):
                # A trainable W_p is refreshed after the optimizer used this step's gradient.
                if in_step and self.trainable:
                    self.schedule.deferred = True
                else:
                    self._refresh()
            self.mirror.send(torch.stack([self.stats.num_skipped, self.refresher.refresh_rejections]))

    def _refresh(self, force: bool = False) -> Tensor:
        self.snapshots.changed()
        # wherever it runs (a deferred refresh lands inside the caller's autocast region)
        with torch.no_grad(), autocast_disabled(self.weight.device.type):
            return self.refresher.refresh_(self.weight.detach(), self.stats.corr, self.stats.num_updates, force=force)

    def refresh(self) -> bool:
        """Recompute ``W_p`` from the current estimate now; False if it was kept (reads the result)."""
        return bool(self._refresh(force=True))

    # ------------------------------------------------------------- diagnostics
    def effective_corr(self) -> Tensor:
        """The matrix ``W_p`` is computed from: ``F_hat``, or the covariance with ``center``."""
        return self.stats.corr

    def spectra(self) -> Dict[str, Tensor]:
        """Eigenvalues (descending, float64) of ``F_hat`` and of the symmetric part of ``W_p``."""
        return diagnostics.spectra(self)

    def alignment(self) -> float:
        """Eigenspace alignment of ``W_p`` with ``F_hat``; 1 for the exact DirectPred rule."""
        return diagnostics.alignment(self)

    def diagnostics(self) -> Dict[str, float]:
        """Scalars for logging, named after the state they read (two float64 eigendecompositions)."""
        return diagnostics.diagnostics(self)

    # ------------------------------------------------------------ bookkeeping
    def reset_running_stats(self) -> None:
        """Forget all statistics, counters and schedule; ``W_p`` back to the identity."""
        with torch.no_grad():
            self.stats.reset_running_stats()
            self.refresher.reset()
            self.weight.copy_(torch.eye(self.options.dim, dtype=self.weight.dtype, device=self.weight.device))
        self.schedule.reset()
        self.mirror.reset()
        self.snapshots = WeightSnapshots()

    def get_extra_state(self) -> Dict[str, Any]:
        if self.schedule.calls and self.stats.reduces():
            raise RuntimeError(
                f"DirectPredHead cannot be saved with an open pool of {self.schedule.calls} call(s) under "
                "torch.distributed: each rank holds its own part until the pool is folded. Save between "
                "steps (with calls_per_update='auto' a step's pool is folded by its backward pass), or after "
                "a multiple of calls_per_update calls.")
        return {"schedule": self.schedule.state_dict(), "mirror": self.mirror.state_dict()}

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        self.schedule.load_state_dict(state["schedule"])
        self.mirror.load_state_dict(state["mirror"])

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        metadata = getattr(destination, "_metadata", None)  # lets a load refuse before copying anything
        if metadata is not None:
            metadata.setdefault(prefix[:-1], {}).update(dim=self.options.dim, variant=self.options.variant)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        migrate_state_dict(self, state_dict, prefix, local_metadata)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self.snapshots = WeightSnapshots()  # W_p was overwritten: a new record, no stale copy

    def _apply(self, fn, recurse=True):
        weight = self.weight
        super()._apply(fn, recurse)
        if not self.trainable and self.weight.dtype != weight.dtype:  # a buffer W_p keeps stats_dtype
            self.weight = weight.to(device=self.weight.device)
        self.snapshots.drop()
        return self

    def _check_input(self, z: Tensor) -> None:
        dim = self.options.dim
        if not isinstance(z, Tensor):
            raise TypeError(f"DirectPredHead expects a torch.Tensor of shape (batch, {dim}), got {type(z).__name__}")
        if z.dim() != 2 or z.shape[1] != dim:
            raise ValueError(f"DirectPredHead(dim={dim}) expects input of shape (batch, {dim}), got {tuple(z.shape)}")
        if not z.is_floating_point():
            raise ValueError(f"DirectPredHead expects a floating-point input, got {z.dtype}")

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def extra_repr(self) -> str:
        o = self.options
        return (f"dim={o.dim}, variant={o.variant!r}, rho={o.rho}, eps={o.eps}, freq={o.freq}, "
                f"calls_per_update={self.calls_per_update!r}, trainable={o.trainable}, refresh={o.refresh!r}")

    # The owners' state under the names earlier releases used.
    corr = property(lambda self: self.stats.corr)
    mean = property(lambda self: self.stats.mean)
    num_updates = property(lambda self: self.stats.num_updates)
    num_skipped = property(lambda self: self.stats.num_skipped)
    last_collapse = property(lambda self: self.stats.last_collapse)
    refreshed_at = property(lambda self: self.refresher.refreshed_at)
    refresh_rejections = property(lambda self: self.refresher.refresh_rejections)


_SKIP_WARNING = (
    "DirectPredHead skipped a training step whose statistics were not representable (NaN/inf in a batch, "
    "sums that overflowed, or squares that underflowed the statistics' dtype: stats_dtype=torch.float64 "
    "holds smaller scales); its statistics and W_p are unchanged. Further skips are counted in "
    "`num_skipped` without warning."
)
_REJECTION_WARNING = (
    "DirectPredHead could not use a refresh (eigendecomposition failed in the statistics' dtype and in "
    "float64, or an iterative result exceeded its error bound); keeping the previous W_p. Counted in "
    "`refresh_rejections`; after a refused iterative result the next refresh computes a thorough iterative "
    "candidate (float64, more squarings, no host wait), and only if that is refused too the one after uses "
    "the exact rule (`thorough_refreshes`, `exact_refreshes` in `diagnostics()`)."
)
