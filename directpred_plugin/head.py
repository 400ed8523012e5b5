"""The DirectPred predictor head: ``W_p`` set in closed form from the running statistics of its input."""

from __future__ import annotations

import functools
import inspect
import sys
import warnings
import weakref
import zlib
from types import FrameType
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import functional
from .distributed import initialized, rank, world_size
from .functional import Pool, empty_pool
from .options import AUTO, check_head_options
from .refresh import exact_candidate, iterative_candidate, refresh_weight_, thorough_options, uses_iterative
from .steps import (CHECKPOINT_ERROR, EXACT, THOROUGH, Steps, autocast_disabled, in_reentrant_checkpoint,
                    inside_backward, linear, upstream_parameters)
from .variants import VARIANTS, RuleOptions

__all__ = ["DirectPredHead", "CallsPerUpdate", "read_diagnostics"]

CallsPerUpdate = Union[int, str]
#: The layout of the tensor a head saves as its extra state (``state_dict()[prefix + "_extra_state"]``).
_FORMAT = 6
_HEADER = 4  # format, dim, variant, center
_NUM_UPDATES, _NUM_SKIPPED, _REFRESHED_AT, _REFRESH_REJECTIONS = range(4)
#: Key prefixes of the development formats before this one (owners' submodules, flat counters and pools).
_EARLIER_KEYS = ("stats.", "refresher.", "num_updates", "num_skipped", "refreshed_at", "refresh_rejections",
                 "pending_")
#: Heads whose step waits for an optimizer step (told by torch's optimizer hook).
_WAITING: "weakref.WeakSet[DirectPredHead]" = weakref.WeakSet()
_optimizer_hook: Optional[Any] = None


class DirectPredHead(nn.Module):
    """Predictor set in closed form from the correlation of its input (DirectPred and its family).

    Non-contrastive SSL (BYOL, SimSiam) avoids collapse because the predictor ``W_p`` aligns
    with the eigenspace of the correlation ``F = E[z z^T]`` of its input [0]. DirectPred sets
    ``W_p = U diag(sqrt(s / max s) + eps) U^T`` from an EMA ``F_hat = U diag(s) U^T`` instead
    of learning it; ``variant`` picks another member of the family (``VARIANTS``). Each
    training-mode call returns ``z @ W_p^T`` and pools the batch's moments; each training step
    folds its pool into ``F_hat`` and every ``freq``-th step refreshes ``W_p``. A step is what
    the optimizer steps: with ``calls_per_update="auto"`` (the default) every call between two
    optimizer steps (every view, every micro-batch of gradient accumulation) pools into one
    update. In eval mode, or without grad, the head is the linear map ``z @ W_p^T``.

    Running statistics are kept like ``torch.nn.BatchNorm``'s: ``weight`` (``W_p``), ``corr``
    (``F_hat``) and, with ``center``, ``mean`` are buffers (``weight`` a parameter when
    ``trainable``); the counters, the open pool and the step schedule are saved as one tensor,
    the module's extra state.

    - [0]: Tian, Chen & Ganguli, "Understanding self-supervised learning dynamics without
      contrastive pairs", ICML 2021, https://arxiv.org/abs/2102.06810

    Args:
        dim: Width of the projections ``z`` (the head maps ``(batch, dim)`` to ``(batch, dim)``).
        rho: EMA decay of ``F_hat`` in [0, 1): ``F_hat <- rho F_hat + (1 - rho) C``. None: the
            variant's (0.3; 0 for the matrix-product members).
        eps: Added to each predictor eigenvalue (DirectCopy: to the diagonal), >= 0. None: the
            variant's (0.01; 0 for the matrix-product members).
        freq: Refresh ``W_p`` every ``freq`` steps. None: the variant's (1; 5 for the hybrid).
        variant: The member of the family, a name of ``VARIANTS``.
        trainable: ``W_p`` is an ``nn.Parameter`` the optimizer trains between refreshes (the
            paper's hybrid; needs ``freq > 1``). None: the variant's.
        center: Use the covariance ``F_hat - mu mu^T`` instead of the raw correlation.
        calls_per_update: ``"auto"``: one update per optimizer step; an integer ``n``: a step
            ends after ``n`` training calls.
        stats_dtype: dtype of ``F_hat`` and of the refresh (``torch.float32`` or ``torch.float64``).
        sync_dist: Under ``torch.distributed``, sum each step's statistics over the ranks.
        process_group: The group of that sum (default: the world); only with ``sync_dist``.
        refresh: How ``F_hat`` becomes ``W_p``: ``"exact"``, ``"iterative"`` (matrix products
            under a certified error bound) or ``"auto"`` (exact on the CPU, iterative on
            accelerators).
        refresh_options: Options of the iterative refresh (``tol``, ``squarings``,
            ``sqrt_steps``, ``sqrt_floor``).
        alpha: DirectSet's power (``variant="directset"`` only; None means 0.5).
        eps_inside: Put ``eps`` inside the power, ``(s_j / max s + eps)^alpha``.
        ridge: Added times ``I`` to the normalised statistics before the rule, >= 0.
        weight_momentum: EMA on ``W_p`` itself: ``W_p <- m W_p + (1 - m) W_new`` at a refresh.

    Raises:
        ValueError: An option out of range, or one that means nothing for the configuration
            (named, with what was expected).

    Examples:
        >>> predictor = DirectPredHead(256)  # replaces BYOL's 256-4096-256 MLP
        >>> p0, p1 = predictor(projector(backbone(x0))), predictor(projector(backbone(x1)))
    """

    _version = _FORMAT
    weight: Tensor
    corr: Tensor
    mean: Optional[Tensor]

    def __init__(self, dim: int, *, rho: Optional[float] = None, eps: Optional[float] = None,
                 freq: Optional[int] = None, variant: str = "directpred", trainable: Optional[bool] = None,
                 center: bool = False,
                 calls_per_update: CallsPerUpdate = AUTO, stats_dtype: torch.dtype = torch.float32,
                 sync_dist: bool = True, process_group: Optional[Any] = None, refresh: str = "auto",
                 refresh_options: Optional[Dict[str, Any]] = None, alpha: Optional[float] = None,
                 eps_inside: bool = False, ridge: float = 0.0, weight_momentum: float = 0.0) -> None:
        super().__init__()
        options = check_head_options(
            dim, rho=rho, eps=eps, freq=freq, variant=variant, trainable=trainable, center=center,
            calls_per_update=calls_per_update, stats_dtype=stats_dtype, sync_dist=sync_dist,
            process_group=process_group, refresh=refresh, refresh_options=refresh_options, alpha=alpha,
            eps_inside=eps_inside, ridge=ridge, weight_momentum=weight_momentum)
        self.dim: int = options["dim"]
        self.rho: float = options["rho"]
        self.eps: float = options["eps"]
        self.freq: int = options["freq"]
        self.variant: str = options["variant"]
        self.alpha: float = options["alpha"]
        self.eps_inside: bool = options["eps_inside"]
        self.trainable: bool = options["trainable"]
        self.center: bool = options["center"]
        self.stats_dtype: torch.dtype = options["stats_dtype"]
        self.sync_dist: bool = options["sync_dist"]
        self.process_group = options["process_group"]
        self.refresh_strategy: str = options["refresh"]
        self.refresh_options: Dict[str, Any] = options["refresh_options"]
        self.ridge: float = options["ridge"]
        self.weight_momentum: float = options["weight_momentum"]
        if self.trainable:  # the optimizer's, so it follows the module's dtype
            self.weight = nn.Parameter(torch.eye(self.dim))
        else:
            self.register_buffer("weight", torch.eye(self.dim, dtype=self.stats_dtype))
        self.register_buffer("corr", torch.zeros(self.dim, self.dim, dtype=self.stats_dtype))
        self.register_buffer("mean", torch.zeros(self.dim, dtype=self.stats_dtype) if self.center else None)
        # Not buffers: counters are not averaged by weight averaging, and this rank's open pool is
        # not overwritten by DDP's buffer broadcast. Saved in the extra state.
        self._counters = torch.zeros(4, dtype=torch.long)
        self._pool, self._shift = self._empty_pool(torch.device("cpu"))
        self._unclaimed: Optional[Pool] = None  # a loaded pool not yet known to be this rank's
        self.steps = Steps(self.freq, options["calls_per_update"])
        self._warned: set = set()

    @staticmethod
    def check_options(dim: int, **options: Any) -> Dict[str, Any]:
        """What ``DirectPredHead(dim, **options)`` would be built with, validated without building it.

        The signature's defaults for the options not given, then `check_head_options`:
        the same ``ValueError`` the constructor raises (``TypeError`` for an unknown option), and
        the options cleaned as it returns them. Adapters check a configuration with it before
        they build a model.
        """
        bound = inspect.signature(DirectPredHead.__init__).bind(None, dim, **options)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        del arguments["self"]
        return check_head_options(**arguments)

    # ------------------------------------------------------------------ state read by users
    @property
    def calls_per_update(self) -> CallsPerUpdate:
        return AUTO if self.steps.calls_per_update is None else self.steps.calls_per_update

    num_updates = property(lambda self: self._counters[_NUM_UPDATES], doc="Folded updates of ``F_hat`` (0-dim).")
    num_skipped = property(lambda self: self._counters[_NUM_SKIPPED], doc="Steps skipped as not representable.")
    refreshed_at = property(lambda self: self._counters[_REFRESHED_AT], doc="``num_updates`` at the last refresh.")
    refresh_rejections = property(lambda self: self._counters[_REFRESH_REJECTIONS],
                                  doc="Refresh candidates refused (an iterative bound above ``tol``, or a failure).")

    # ------------------------------------------------------------------ forward
    def forward(self, z: Tensor) -> Tensor:
        self._check_input(z)
        if self.training and torch.is_grad_enabled():
            return self._training_call(z)
        if self.training and in_reentrant_checkpoint():
            raise RuntimeError(CHECKPOINT_ERROR.format("reentrant checkpointing runs the forward under "
                                                       "no_grad, where the head collects no statistics"))
        return linear(z, self.weight if self.trainable else self.weight.detach().clone())

    @torch.compiler.disable
    def _training_call(self, z: Tensor) -> Tensor:
        """One training-mode call, eager under torch.compile: the schedule is decided on the host."""
        steps = self.steps
        if inside_backward():  # activation checkpointing recomputes the forward
            return linear(z, steps.weight_for_recomputation(self.weight, self.trainable, z.dtype))
        self._check_rank_local_statistics()
        if steps.pool_ended():  # an update other than torch.optim's (or the optimizer hook missed it)
            self._end_step()
        weight, snapshot = steps.weight_for_call(self.weight, self.trainable, z.dtype)
        if not (z.requires_grad or self.trainable) and steps.auto:
            # No backward pass can reach this call, so it is a step of its own.
            self._close(batch=z)
            return linear(z, weight)
        if not steps.watching():
            watched = upstream_parameters(z)
            steps.watch(watched, self.weight if self.trainable else None)
            if watched or self.trainable:
                _wait_for_optimizer_step(self)
        self._collect(z, opens_pool=steps.calls == 0)
        if steps.add_call():
            self._close()
        out = linear(z, weight)
        if out.requires_grad:
            steps.record(out, snapshot, _weak_method(self._backward_reached))
        return out

    def _backward_reached(self) -> None:
        steps = self.steps
        if steps.backward_reached():  # nothing to watch: the backward pass ends the step, beside the rest of it
            steps.run_beside_backward(self.weight.device, self._close)

    def _end_step(self) -> None:
        _WAITING.discard(self)
        self.steps.run_beside_backward(self.weight.device, self._close)

    @torch.no_grad()
    def update(self, z: Tensor) -> None:
        """Add a batch to the statistics without computing an output.

        With ``"auto"`` it is an update of its own; with an integer ``calls_per_update`` it
        counts as one call. Collective under DDP: every rank must call it equally often.
        """
        self._check_input(z)
        if self.steps.auto:
            self._close(batch=z)
            return
        self._collect(z, opens_pool=self.steps.calls == 0)
        if self.steps.add_call():
            self._close()

    # ------------------------------------------------------------------ statistics
    def _empty_pool(self, device: torch.device) -> tuple:
        pool = empty_pool(self.dim, self.stats_dtype, device)
        return pool, (torch.zeros(self.dim, dtype=self.stats_dtype, device=device) if self.center else None)

    def _collect(self, z: Tensor, opens_pool: bool, pool: Optional[Pool] = None,
                 shift: Optional[Tensor] = None) -> None:
        # moments in stats_dtype even inside the caller's autocast region (it would run x^T x in bf16)
        with torch.no_grad(), autocast_disabled(z.device.type):
            x = z.detach().to(self.stats_dtype)
            if pool is None:
                pool, shift = self._pool, self._shift
            functional.pool_moments_(pool, shift, x, opens_pool=opens_pool, mean=self.mean)

    def _reduces(self) -> bool:
        return self.sync_dist and world_size(self.process_group) > 1

    def _close(self, batch: Optional[Tensor] = None) -> None:
        """End a step: fold the open pool (or ``batch`` as an update of its own), refresh on schedule."""
        steps = self.steps
        with torch.no_grad(), autocast_disabled(self.weight.device.type):
            grown = steps.receive_counters()
            if grown[0] > 0:
                self._warn_once("nonfinite", _SKIP_WARNING)
            if grown[1] > 0:
                steps.rejection_learned()
                self._warn_once("refresh", _REJECTION_WARNING)
            if batch is None:
                pool, shift = self._pool, self._shift
                self._claim_loaded_pool()
            else:
                pool, shift = self._empty_pool(batch.device)
                self._collect(batch, True, pool, shift)
            if self._reduces():
                pool, shift = functional.all_reduce_pool(pool, shift, self.mean, self.process_group)
            counters = self._counters
            _, skipped = functional.fold_(self.corr, self.mean, counters[_NUM_UPDATES], pool, self.rho, shift)
            counters[_NUM_SKIPPED].add_(skipped)
            if batch is None:
                for tensor in self._pool:
                    tensor.zero_()
            if steps.close(empties_pool=batch is None):
                self._refresh()
            steps.send_counters(counters[[_NUM_SKIPPED, _REFRESH_REJECTIONS]])

    def _claim_loaded_pool(self) -> None:
        if self._unclaimed is not None:  # loaded before the ranks were known: rank 0's alone
            if self._reduces() and rank(self.process_group) != 0:
                for mine, loaded in zip(self._pool, self._unclaimed):
                    mine.sub_(loaded)
            self._unclaimed = None

    def _refresh(self, force: bool = False) -> Tensor:
        variant = VARIANTS[self.variant]
        rule = RuleOptions(eps=self.eps, alpha=self.alpha, eps_inside=self.eps_inside)
        counters = self._counters
        stats = self.corr
        iterative = uses_iterative(self.refresh_strategy, stats.device, variant, rule)
        level = self.steps.refresh_level(iterative)
        if not iterative or level == EXACT:
            chosen: Any = exact_candidate
        else:
            options = thorough_options(self.refresh_options) if level == THOROUGH else self.refresh_options
            chosen = functools.partial(iterative_candidate, **options)
        changed = counters[_NUM_UPDATES] > (0 if force else counters[_REFRESHED_AT])
        with torch.no_grad(), autocast_disabled(self.weight.device.type):
            return refresh_weight_(
                self.weight.detach(), stats, chosen, variant, rule, changed=changed,
                refreshed_at=counters[_REFRESHED_AT], num_updates=counters[_NUM_UPDATES],
                refresh_rejections=counters[_REFRESH_REJECTIONS], ridge=self.ridge,
                weight_momentum=self.weight_momentum)

    def refresh(self) -> bool:
        """Recompute ``W_p`` from the current estimate now; False if it was kept (reads the result)."""
        return bool(self._refresh(force=True))

    def _check_rank_local_statistics(self) -> None:
        """Rank-local statistics (``sync_dist=False``) must not be replaced by rank 0's at each forward."""
        if self.sync_dist or not initialized() or world_size() == 1:
            return
        ddp = _enclosing_ddp()
        if ddp is None or not getattr(ddp, "broadcast_buffers", True):
            return
        if any(buffer is self.corr for buffer in getattr(ddp, "modules_buffers", [self.corr])):
            raise RuntimeError(
                "DirectPredHead(sync_dist=False) keeps rank-local statistics, but the DistributedDataParallel "
                "around it broadcasts rank 0's buffers at every forward (broadcast_buffers=True, the default; "
                "forward_sync_buffers in newer PyTorch), which would replace every rank's F_hat and W_p with rank "
                "0's. Wrap the model with DistributedDataParallel(..., broadcast_buffers=False) (Lightning: "
                "DDPStrategy(broadcast_buffers=False)), or use sync_dist=True.")

    # ------------------------------------------------------------------ diagnostics
    def effective_corr(self) -> Tensor:
        """The matrix ``W_p`` is computed from: ``F_hat``, or the covariance with ``center``."""
        return self.corr

    @torch.no_grad()
    def spectra(self) -> Dict[str, Tensor]:
        """Eigenvalues (descending, float64) of ``F_hat`` and of the symmetric part of ``W_p``."""
        weight = self.weight.detach().double()
        return {"corr": torch.linalg.eigvalsh(self.corr.double()).flip(0),
                "weight": torch.linalg.eigvalsh((weight + weight.mT) / 2).flip(0)}

    @torch.no_grad()
    def alignment(self) -> float:
        """Eigenspace alignment of ``W_p`` with ``F_hat``; 1 for the exact DirectPred rule, NaN before any update."""
        value = functional.eigenspace_alignment(self.weight, self.corr)
        return float(torch.where(self._counters[_NUM_UPDATES].to(value.device) > 0, value, float("nan")))

    @torch.no_grad()
    def diagnostic_tensors(self) -> Dict[str, Tensor]:
        """The diagnostics held on the head's device, as 0-dim float64 tensors there, none read on the host.

        One float64 eigendecomposition of ``F_hat`` (its eigenvectors give the alignment, its
        eigenvalues RankMe and the effective rank) and one of the symmetric part of ``W_p``;
        on CUDA each waits for its convergence check. Values that need an update are NaN before one.
        """
        eigenvalues, eigenvectors = torch.linalg.eigh(self.corr.detach().double())
        weight = self.weight.detach().double()
        weight_eigenvalues = torch.linalg.eigvalsh((weight + weight.mT) / 2)
        counters = self._counters.to(device=eigenvalues.device, dtype=torch.float64)
        updated = counters[_NUM_UPDATES] > 0
        nan = eigenvalues.new_full((), float("nan"))
        return {
            "alignment": torch.where(updated, functional.alignment_from_eigh(weight, eigenvalues, eigenvectors), nan),
            "rankme": torch.where(updated, functional.rankme(eigenvalues), nan),
            "corr_effective_rank": torch.where(updated, functional.effective_rank(eigenvalues), nan),
            "corr_eig_max": eigenvalues[-1], "corr_eig_min": eigenvalues[0],
            "weight_eig_max": weight_eigenvalues[-1], "weight_eig_min": weight_eigenvalues[0],
            "num_updates": counters[_NUM_UPDATES], "num_skipped": counters[_NUM_SKIPPED],
            "refresh_rejections": counters[_REFRESH_REJECTIONS],
        }

    def schedule_counts(self) -> Dict[str, float]:
        """The diagnostics the host keeps (the step schedule's counters): nothing to read from the device."""
        steps = self.steps
        return {"num_steps": float(steps.steps), "exact_refreshes": float(steps.exact_refreshes),
                "thorough_refreshes": float(steps.thorough_refreshes)}

    def diagnostics(self) -> Dict[str, float]:
        """Scalars for logging, named after the state they read: `diagnostic_tensors`, read
        from the device at once, and `schedule_counts`."""
        return read_diagnostics([self])[0]

    # ------------------------------------------------------------------ bookkeeping
    def reset_running_stats(self) -> None:
        """Forget all statistics, counters and schedule; ``W_p`` back to the identity."""
        with torch.no_grad():
            self.corr.zero_()
            if self.mean is not None:
                self.mean.zero_()
            self._counters.zero_()
            self.weight.copy_(torch.eye(self.dim, dtype=self.weight.dtype, device=self.weight.device))
        self._pool, self._shift = self._empty_pool(self.corr.device)
        self._unclaimed = None
        self.steps.reset()
        _WAITING.discard(self)

    def get_extra_state(self) -> Tensor:
        """The counters, the schedule and the open pool, as one float64 tensor (read on the host)."""
        steps = self.steps
        if steps.calls and self._reduces():
            raise RuntimeError(
                f"DirectPredHead cannot be saved with an open pool of {steps.calls} call(s) under "
                "torch.distributed: each rank holds its own part until the pool is folded. Save between "
                "steps (with calls_per_update='auto' a step's pool is folded when its optimizer step ran), "
                "or after a multiple of calls_per_update calls.")
        header = [_FORMAT, self.dim, _variant_id(self.variant), int(self.center)]
        numbers = torch.tensor(header + steps.state() + [0] * 4 + [int(steps.calls > 0)], dtype=torch.float64)
        numbers[_HEADER + Steps.STATE_SIZE:-1] = self._counters.detach().to("cpu", torch.float64)
        parts = [numbers]
        if steps.calls:
            pool = [self._pool.rows.reshape(1), self._pool.total]
            pool += [self._shift] if self._shift is not None else []
            parts += [tensor.detach().to("cpu", torch.float64).flatten() for tensor in (*pool, self._pool.outer)]
        return torch.cat(parts)

    def set_extra_state(self, state: Any) -> None:
        values = _check_saved_state(state, self.dim, self.variant, self.center, "the head")
        offset = _HEADER + Steps.STATE_SIZE
        self.steps.load_state(values[_HEADER:offset].long().tolist())
        with torch.no_grad():
            self._counters.copy_(values[offset:offset + 4].to(torch.long))
        device = self.corr.device
        pool, shift = self._empty_pool(device)
        self._unclaimed = None
        if values[offset + 4] > 0:
            dim, rest = self.dim, values[offset + 5:].to(device=device, dtype=self.stats_dtype)
            pool.rows.copy_(rest[0])
            pool.total.copy_(rest[1:1 + dim])
            if shift is not None:
                shift.copy_(rest[1 + dim:1 + 2 * dim])
            pool.outer.copy_(rest[-dim * dim:].view(dim, dim))
            # A saved pool is the whole pool of its run: rank 0 continues it, the other ranks start empty.
            if self._reduces():
                if rank(self.process_group) != 0:
                    for tensor in pool:
                        tensor.zero_()
            elif self.sync_dist and not initialized():  # the ranks are not known yet: decided at the first fold
                self._unclaimed = Pool(*(tensor.clone() for tensor in pool))
        self._pool, self._shift = pool, shift

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        where = prefix[:-1] or "the head"
        earlier = [key for key in state_dict if key.startswith(tuple(prefix + name for name in _EARLIER_KEYS))]
        saved = state_dict.get(prefix + "_extra_state")
        if earlier or (saved is not None and not isinstance(saved, Tensor)):
            raise RuntimeError(
                f"cannot load {where}: the checkpoint was saved by a development version of DirectPredHead "
                f"before format {_FORMAT} (keys such as {(earlier or [prefix + '_extra_state'])[0]!r}); "
                "retrain, or load it with the version that saved it.")
        weight = state_dict.get(prefix + "weight")
        if isinstance(weight, Tensor) and weight.shape != self.weight.shape:
            raise RuntimeError(
                f"cannot load a DirectPredHead checkpoint with dim={weight.shape[-1]} into a head with "
                f"dim={self.dim} ({where}); build the head with the checkpoint's settings.")
        if saved is not None:
            _check_saved_state(saved, self.dim, self.variant, self.center, where)
        has_mean = isinstance(state_dict.get(prefix + "mean"), Tensor)
        if has_mean != self.center and (has_mean or saved is not None or isinstance(weight, Tensor)):
            raise RuntimeError(
                f"cannot load a DirectPredHead checkpoint with center={has_mean} into a head with "
                f"center={self.center} ({where}): the saved statistics are a "
                f"{'covariance' if has_mean else 'correlation'}; build the head with center={has_mean}.")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self.steps.drop_copies()  # W_p was overwritten
        _WAITING.discard(self)

    def _apply(self, fn, recurse=True):
        before = {name: buffer for name, buffer in self.named_buffers(recurse=False)}
        super()._apply(fn, recurse)
        # Statistics (and a buffer W_p) keep their dtype through .half()/.to(dtype): only their device follows.
        for name, old in before.items():
            new = getattr(self, name)
            if new is not None and old is not None and new.dtype != old.dtype:
                setattr(self, name, old.to(device=new.device))
        # The tensors that are not buffers follow the same function (.to, .cuda, to_empty), dtype kept.
        def follow(tensor: Tensor) -> Tensor:
            moved = fn(tensor)
            return moved if moved.dtype == tensor.dtype else tensor.to(device=moved.device)

        self._counters = follow(self._counters)
        self._pool = Pool(*(follow(tensor) for tensor in self._pool))
        if self._shift is not None:
            self._shift = follow(self._shift)
        if self._unclaimed is not None:
            self._unclaimed = Pool(*(follow(tensor) for tensor in self._unclaimed))
        self.steps.drop_copies()
        return self

    def _check_input(self, z: Tensor) -> None:
        dim = self.dim
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
        return (f"dim={self.dim}, variant={self.variant!r}, rho={self.rho}, eps={self.eps}, freq={self.freq}, "
                f"trainable={self.trainable}, refresh={self.refresh_strategy!r}")


def read_diagnostics(heads: Sequence[DirectPredHead]) -> List[Dict[str, float]]:
    """`DirectPredHead.diagnostics` of every head, with one host read per device the heads are on."""
    tensors = [head.diagnostic_tensors() for head in heads]
    by_device: Dict[torch.device, List[int]] = {}
    for index, values in enumerate(tensors):
        by_device.setdefault(next(iter(values.values())).device, []).append(index)
    read: List[Dict[str, float]] = [{} for _ in heads]
    for indices in by_device.values():
        stacked = torch.stack([value for i in indices for value in tensors[i].values()]).tolist()
        for i in indices:
            names = list(tensors[i])
            read[i] = dict(zip(names, stacked[:len(names)]))
            stacked = stacked[len(names):]
    return [{**values, **head.schedule_counts()} for values, head in zip(read, heads)]


def _variant_id(variant: str) -> int:
    return zlib.crc32(variant.encode())


def _check_saved_state(state: Any, dim: int, variant: str, center: bool, where: str) -> Tensor:
    """The saved extra state as float64 values, after refusing one of another configuration."""
    if not isinstance(state, Tensor) or state.dim() != 1 or state.numel() < _HEADER + Steps.STATE_SIZE + 5:
        raise RuntimeError(f"cannot load {where}: its saved state is not a DirectPredHead format {_FORMAT} state")
    values = state.detach().to("cpu", torch.float64)
    version, saved_dim, saved_variant, saved_center = (int(v) for v in values[:_HEADER])
    if version != _FORMAT:
        raise RuntimeError(f"cannot load {where}: saved in format {version}, this DirectPredHead reads format {_FORMAT}")
    names = {_variant_id(name): name for name in VARIANTS}
    for option, saved, own in (("dim", saved_dim, dim), ("variant", names.get(saved_variant, "unknown"), variant),
                               ("center", bool(saved_center), center)):
        if saved != own:
            raise RuntimeError(
                f"cannot load a DirectPredHead checkpoint with {option}={saved!r} into a head with "
                f"{option}={own!r} ({where}); build the head with the checkpoint's settings.")
    return values


def _enclosing_ddp() -> Optional[Any]:
    """The DistributedDataParallel whose forward this call runs inside, if any."""
    ddp_type = torch.nn.parallel.DistributedDataParallel
    frame: Optional[FrameType] = sys._getframe(2)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, ddp_type):
            return owner
        frame = frame.f_back
    return None


def _weak_method(method: Any) -> Any:
    ref = weakref.WeakMethod(method)

    def call() -> None:
        bound = ref()
        if bound is not None:
            bound()

    return call


def _wait_for_optimizer_step(head: DirectPredHead) -> None:
    global _optimizer_hook
    if _optimizer_hook is None:
        _optimizer_hook = register_optimizer_step_post_hook(_after_optimizer_step)
    _WAITING.add(head)


def _after_optimizer_step(optimizer: Any, args: Any, kwargs: Any) -> None:
    # End the steps this optimizer step ended now, not at the next call: the fold and refresh then
    # overlap the caller's next work on CUDA, and state saved after the step is complete.
    waiting = list(_WAITING)
    if not waiting:
        return
    stepped = {id(param) for group in optimizer.param_groups for param in group["params"]}
    for head in waiting:
        if head.steps.pool_ended(stepped):
            head._end_step()


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
