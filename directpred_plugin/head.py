"""The DirectPred predictor head: running statistics, a refresh schedule and a closed-form ``W_p``."""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import functional
from .distributed import all_reduce_sum_, world_size
from .refresh import REFRESH_STRATEGIES, AutoRefresh
from .rules import VARIANTS, RuleOptions, all_finite, normalise_statistics
from .statistics import Pool, accumulate_, batch_moments, fold_, merge_

__all__ = ["DirectPredHead", "CallsPerUpdate"]

_STATS_DTYPES = (torch.float32, torch.float64)
#: State a checkpoint may lack (see DirectPredHead._fill_optional_state).
_OPTIONAL_STATE = ("refreshed_at", "refresh_rejections", "num_empty")
#: ``calls_per_update`` value that pools the calls between two backward passes.
AUTO = "auto"
CallsPerUpdate = Union[int, str]


def _autocast_disabled(device_type: str) -> contextlib.AbstractContextManager:
    try:
        return torch.autocast(device_type=device_type, enabled=False)
    except RuntimeError:  # a device type autocast does not know, so nothing to disable
        return contextlib.nullcontext()


def _inside_backward() -> bool:
    """True while autograd runs a backward pass (where activation checkpointing recomputes)."""
    return torch._C._current_graph_task_id() != -1


class DirectPredHead(nn.Module):
    """Predictor set in closed form from the correlation of its input (DirectPred and family).

    Non-contrastive SSL (BYOL, SimSiam) avoids collapse because the predictor ``W_p``
    aligns with the eigenspace of the correlation ``F = E[z z^T]`` of its input [0].
    DirectPred sets ``W_p`` directly instead of learning it: it keeps an exponential
    moving average ``F_hat`` of batch correlations, eigendecomposes
    ``F_hat = U diag(s) U^T`` and uses ``W_p = U diag(p) U^T`` with
    ``p_j = sqrt(max(s_j, 0) / max_k s_k) + eps``. Other members of the family are chosen
    with ``variant`` (a key of :data:`directpred_plugin.VARIANTS`): ``"directcopy"``
    (``W_p = F_hat / lambda_max + eps I``, [1]) and ``"directset"`` (power ``alpha``, [1]).

    - [0]: Tian, Chen & Ganguli, "Understanding self-supervised learning dynamics
      without contrastive pairs", ICML 2021, https://arxiv.org/abs/2102.06810
    - [1]: Wang et al., "Towards demystifying representation learning with
      non-contrastive self-supervision", 2021, https://arxiv.org/abs/2110.04947

    One update pipeline, the same on every device. A training-mode call ``head(z)``
    (module in ``train()`` mode, autograd enabled)

      1. returns ``z @ W_p^T`` with the ``W_p`` of earlier updates (an immutable snapshot,
         so a later refresh never alters what autograd saved),
      2. adds ``z^T z``, ``sum z`` and the row count of the detached batch (summed over
         ranks under DDP) to a pool,
      3. when the pool closes (see ``calls_per_update``) folds it into ``F_hat``: ``F_hat = C`` on the first update, else
         ``F_hat <- rho * F_hat + (1 - rho) * C`` with ``C`` the pooled correlation; a pool
         with a non-finite entry is skipped on the device, state unchanged,
      4. every ``freq``-th closed pool (a training step; skipped ones count, so the
         schedule never waits for the device), recomputes ``W_p`` from the scale-normalised
         ``F_hat`` if ``F_hat`` changed since the last refresh.

    ``W_p`` starts as the identity. Calls in ``eval()`` mode or under ``torch.no_grad()``
    change no state.

    Args:
        dim: Width of the input (and output); ``W_p`` is ``dim x dim``.
        rho: EMA decay of the correlation estimate (paper: 0.3).
        eps: Added to every predictor eigenvalue (DirectCopy: to the diagonal) so that
            weak directions still receive gradient; >= 0. Default 0.01 (the authors' code).
        freq: Recompute ``W_p`` every ``freq`` training steps (paper: 1). With
            ``trainable=True`` and ``freq > 1`` the optimizer trains ``W_p`` between
            refreshes and each refresh overwrites it (the paper's hybrid).
        variant: A key of :data:`directpred_plugin.VARIANTS`.
        trainable: Make ``W_p`` an ``nn.Parameter`` for the optimizer instead of a buffer.
        center: Use the covariance ``F_hat - mu_hat mu_hat^T`` (with an EMA ``mu_hat`` of
            the batch means) instead of the raw correlation.
        calls_per_update: How many training-mode calls pool into one update: an integer
            (1, the default, updates on every call), or ``"auto"``: the calls between two
            backward passes (every view of a training step, multi-crop included) pool into
            one update, made at the first call after the backward. lightly and solo-learn
            call the predictor once per view; ``"auto"`` gives the paper's one update per
            iteration without counting views (the lightly and solo-learn adapters default
            to it). Under ``"auto"`` the input must require grad (that is how a backward
            pass is seen), and the last step's pool is folded by the next step's first call.
        stats_dtype: ``torch.float32`` (default) or ``torch.float64`` for ``F_hat`` and the
            refresh. Statistics never follow ``.half()``/``.to(dtype)``.
        sync_dist: When ``torch.distributed`` is initialised with more than one rank, sum
            each pool over ranks before the fold, so every rank holds the ``F_hat`` and
            ``W_p`` one process would get from the concatenated batch.
        process_group: Group for that reduction (default: the world).
        refresh: A key of :data:`directpred_plugin.REFRESH_STRATEGIES`: ``"exact"``,
            ``"iterative"`` (matrix products only, certified error bound) or ``"auto"``
            (default: the faster of the two, measured on the first refresh).
        refresh_options: Keyword options for the strategy, e.g. ``{"tol": 0.01}``.
        alpha: DirectSet's power (``variant="directset"``): ``p_j = (s_j / max s)^alpha + eps``.
        eps_inside: Put ``eps`` inside the power: ``p_j = (s_j / max s + eps)^alpha``.
        ridge: Added times ``I`` to the normalised statistics before the rule.
        weight_momentum: EMA on ``W_p`` itself: a refresh sets
            ``W_p <- m W_p + (1 - m) W_new`` (the first refresh takes ``W_new``).

    Robustness: a pool with NaN/inf (a bad batch on any rank, or sums that overflow only
    once pooled or reduced) updates nothing. A refresh whose result cannot be used (an
    eigendecomposition that fails in the statistics' dtype and in float64, or an
    iterative result above its certified error bound) keeps the previous ``W_p``; the
    next refresh then uses the exact rule. The host learns of both one update later
    (a lagged, non-blocking copy of two counters) and warns once per kind.
    :meth:`state_dict` holds everything the next call depends on, so a resumed run
    continues exactly as if uninterrupted; a checkpoint of another ``dim`` or ``variant``
    is refused with an error naming both.

    Examples:
        >>> # BYOL with a closed-form predictor instead of the 256-4096-256 MLP
        >>> predictor = DirectPredHead(256, calls_per_update="auto")
        >>> p0, p1 = predictor(projector(backbone(x0))), predictor(projector(backbone(x1)))
        >>> predictor.diagnostics()["alignment"]  # 1.0 for the exact rule
    """

    _version = 2

    weight: Tensor
    corr: Tensor
    mean: Tensor  # registered only with center=True
    pending_outer: Tensor
    pending_sum: Tensor
    pending_count: Tensor
    pending_calls: Tensor
    pending_closed: Tensor
    num_updates: Tensor
    num_skipped: Tensor
    num_empty: Tensor
    refreshed_at: Tensor
    refresh_rejections: Tensor
    last_collapse: Tensor

    def __init__(
        self,
        dim: int,
        *,
        rho: float = 0.3,
        eps: float = 0.01,
        freq: int = 1,
        variant: str = "directpred",
        trainable: bool = False,
        center: bool = False,
        calls_per_update: CallsPerUpdate = 1,
        stats_dtype: torch.dtype = torch.float32,
        sync_dist: bool = True,
        process_group: Optional[Any] = None,
        refresh: str = "auto",
        refresh_options: Optional[Dict[str, Any]] = None,
        alpha: float = 0.5,
        eps_inside: bool = False,
        ridge: float = 0.0,
        weight_momentum: float = 0.0,
    ) -> None:
        super().__init__()
        dim = _check_int("dim", dim, minimum=1)
        freq = _check_int("freq", freq, minimum=1)
        if calls_per_update != AUTO:
            calls_per_update = _check_int("calls_per_update", calls_per_update, minimum=1, also=f"or {AUTO!r}")
        rho = _check_real("rho", rho, 0.0, 1.0, upper_open=True)
        eps = _check_real("eps", eps, 0.0, math.inf)
        alpha = _check_real("alpha", alpha, 0.0, math.inf, lower_open=True)
        ridge = _check_real("ridge", ridge, 0.0, math.inf)
        weight_momentum = _check_real("weight_momentum", weight_momentum, 0.0, 1.0, upper_open=True)
        for name, value in (("trainable", trainable), ("center", center), ("sync_dist", sync_dist),
                            ("eps_inside", eps_inside)):
            _check_bool(name, value)
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
        if refresh not in REFRESH_STRATEGIES:
            raise ValueError(f"refresh must be one of {sorted(REFRESH_STRATEGIES)}, got {refresh!r}")
        if refresh_options is not None and not isinstance(refresh_options, dict):
            raise ValueError(f"refresh_options must be a dict of keyword options, got {refresh_options!r}")
        if stats_dtype not in _STATS_DTYPES:
            raise ValueError(f"stats_dtype must be torch.float32 or torch.float64, got {stats_dtype!r}")

        self.dim = dim
        self.rho = rho
        self.eps = eps
        self.freq = freq
        self.variant = variant
        self.trainable = trainable
        self.center = center
        self.calls_per_update = calls_per_update
        #: calls per pool, or None for "auto" (the pool closes at the next step's first call)
        self._pool_calls: Optional[int] = None if calls_per_update == AUTO else int(calls_per_update)
        self.stats_dtype = stats_dtype
        self.sync_dist = sync_dist
        self.process_group = process_group
        self.refresh_strategy = refresh
        self.refresh_options = dict(refresh_options or {})
        self.ridge = ridge
        self.weight_momentum = weight_momentum
        self.rule_options = RuleOptions(eps=eps, alpha=alpha, eps_inside=eps_inside)
        try:
            self.refresher = REFRESH_STRATEGIES[refresh](dim, **self.refresh_options)
        except TypeError as err:
            raise ValueError(
                f"refresh_options {sorted(self.refresh_options)} are not all options of refresh={refresh!r}: {err}"
            ) from None
        if isinstance(self.refresher, AutoRefresh):
            self.refresher.process_group = process_group if sync_dist else None

        # A buffer W_p is kept like the statistics; a trainable one follows the module dtype.
        if trainable:
            self.weight = nn.Parameter(torch.eye(dim))
        else:
            self.register_buffer("weight", torch.eye(dim, dtype=stats_dtype))
        self.register_buffer("corr", torch.zeros(dim, dim, dtype=stats_dtype))
        if center:
            self.register_buffer("mean", torch.zeros(dim, dtype=stats_dtype))
        self.register_buffer("pending_outer", torch.zeros(dim, dim, dtype=stats_dtype))
        self.register_buffer("pending_sum", torch.zeros(dim, dtype=stats_dtype))
        self.register_buffer("pending_count", torch.zeros((), dtype=stats_dtype))
        self.register_buffer("pending_calls", torch.zeros((), dtype=torch.long))
        # With calls_per_update="auto": the open pool's step has ended (a backward pass ran
        # since its last call). The host flag is copied here only when the state is saved, so
        # that a run resumed between steps closes the pool at its first call, as it would have.
        self.register_buffer("pending_closed", torch.zeros((), dtype=torch.bool))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("num_skipped", torch.zeros((), dtype=torch.long))
        # Pools closed without a row on any rank: with the updates and the skipped ones they
        # are the steps the refresh schedule counts, so a resumed run keeps that schedule.
        self.register_buffer("num_empty", torch.zeros((), dtype=torch.long))
        self.register_buffer("refreshed_at", torch.zeros((), dtype=torch.long))
        self.register_buffer("refresh_rejections", torch.zeros((), dtype=torch.long))
        # a diagnostic of the local batch, so not state that ranks or checkpoints share
        self.register_buffer("last_collapse", torch.full((), float("nan")), persistent=False)
        self._pinned = ["corr", "pending_outer", "pending_sum", "pending_count", "last_collapse"]
        self._pinned += ([] if trainable else ["weight"]) + (["mean"] if center else [])
        self._reset_host_state()

    def _reset_host_state(self) -> None:
        """Host-side mirrors and caches, re-derived from the buffers (after a load or a move)."""
        # The schedule is decided on the host from counts it knows without reading the
        # device: calls in the open pool and closed pools (training steps).
        self._calls_in_group = int(self.pending_calls)
        # Closed pools (steps): folded, skipped or empty.
        self._steps = int(self.num_updates) + int(self.num_skipped) + int(self.num_empty)
        self._generation = 0  # bumped whenever W_p may have changed
        self._snapshot: Optional[Tuple[int, Tensor]] = None
        # Which W_p the calls of the current training step used (for recomputation).
        self._step_generation: Optional[int] = None
        self._step_mixed = False
        self._backward_seen = bool(self.pending_closed) and self._calls_in_group > 0
        self._lagged = _LaggedCounters()
        self._seen_skipped = int(self.num_skipped)
        self._seen_rejections = int(self.refresh_rejections)
        self._exact_next = False
        self._exact_fallbacks = 0
        self._warned: set = set()

    def reset_running_stats(self) -> None:
        """Forget all statistics: ``F_hat``, the pool and the counters; ``W_p`` back to the identity."""
        with torch.no_grad():
            for name in ("corr", "pending_outer", "pending_sum", "pending_count", "pending_calls", "pending_closed",
                         "num_updates", "num_skipped", "num_empty", "refreshed_at", "refresh_rejections"):
                getattr(self, name).zero_()
            if self.center:
                self.mean.zero_()
            self.last_collapse.fill_(float("nan"))
            self.weight.copy_(torch.eye(self.dim, dtype=self.weight.dtype, device=self.weight.device))
        self._reset_host_state()

    # ------------------------------------------------------------------ forward
    def forward(self, z: Tensor) -> Tensor:
        self._check_input(z)
        if self.training and torch.is_grad_enabled():
            weight = self._training_call(z)
        elif self.trainable:
            weight = self.weight
        else:
            weight = self.weight.detach().clone()  # never the buffer itself: a refresh writes it in place
        with _autocast_disabled(z.device.type):
            return F.linear(z, weight.to(z.dtype))

    @torch.compiler.disable
    def _training_call(self, z: Tensor) -> Tensor:
        """The state update of a training-mode call; returns the ``W_p`` its output uses.

        Runs eagerly under ``torch.compile`` (one graph break per call): the schedule is
        decided on the host, and compiled and eager runs execute this same code.
        """
        if _inside_backward():
            return self._weight_for_recomputation()
        if self._backward_seen:  # a backward pass ran since the previous call: a new step
            self._backward_seen = False
            self._step_generation, self._step_mixed = None, False
            if self._pool_calls is None and self._calls_in_group:
                self._close_pool()
        weight = self._weight_for_call()
        if z.requires_grad:
            z.register_hook(self._mark_backward)
        elif self._pool_calls is None:
            raise ValueError(
                "DirectPredHead(calls_per_update='auto') pools the calls between two backward passes, "
                "but this training-mode input does not require grad, so no backward pass can be seen. "
                "Pass an integer calls_per_update, or call head.update(z) to feed statistics."
            )
        self._collect(z)
        if self._pool_calls is not None and self._calls_in_group >= self._pool_calls:
            self._close_pool()
        return weight

    def _mark_backward(self, grad: Tensor) -> None:
        self._backward_seen = True

    def _weight_for_call(self) -> Tensor:
        if self._step_generation is None:
            self._step_generation = self._generation
            if self.trainable:  # the optimizer moved W_p since the last step
                self._snapshot = None
        elif self._step_generation != self._generation:
            self._step_mixed = True
        if self._snapshot is None or self._snapshot[0] != self._generation:
            self._snapshot = (self._generation, self.weight.detach().clone())
        if self.trainable:
            # A differentiable copy: the optimizer trains W_p through it, and a refresh
            # later in this step (in place, on the parameter) leaves it untouched.
            return self.weight.clone()
        return self._snapshot[1]

    def _weight_for_recomputation(self) -> Tensor:
        """The ``W_p`` the forward pass used, for activation checkpointing's recomputation."""
        if self._step_generation is None or self._step_mixed or self._snapshot is None:
            raise RuntimeError(
                "DirectPredHead was recomputed during backward (activation checkpointing), but "
                + ("no training-mode call of this step was seen (reentrant checkpointing runs the "
                   "forward under no_grad, where the head collects no statistics)"
                   if self._step_generation is None else
                   "W_p changed between the calls of this step (calls_per_update updates inside the step)")
                + ", so the output cannot be recomputed exactly. Use torch.utils.checkpoint with "
                "use_reentrant=False and calls_per_update='auto' (W_p changes only between steps), "
                "or keep the head outside the checkpointed function."
            )
        snapshot = self._snapshot[1]
        if self.trainable:  # the values of the forward pass, the gradient to the parameter
            return self.weight + (snapshot - self.weight).detach()
        return snapshot

    @torch.no_grad()
    def update(self, z: Tensor) -> None:
        """Add a batch to the statistics without computing an output.

        Counts as one call towards ``calls_per_update``; with ``"auto"`` it makes one update
        on its own. Collective under DDP: every rank must call it equally often.
        """
        self._check_input(z)
        self._collect(z)
        if self._pool_calls is None or self._calls_in_group >= self._pool_calls:
            self._close_pool()

    # --------------------------------------------------------- statistics
    def _collect(self, z: Tensor) -> None:
        with torch.no_grad(), _autocast_disabled(z.device.type):
            x = z.detach().to(self.stats_dtype)
            if self.sync_dist and world_size(self.process_group) > 1:
                # summed over ranks as they join the pool: every rank holds the same pool
                moments = batch_moments(x)
                _all_reduce_pool_(moments, self.process_group)
                merge_(self._pool(), moments)
            else:
                accumulate_(self._pool(), x)
            # a diagnostic of this batch alone, kept only if the batch could be folded (an
            # empty batch has none: its std would warn and be NaN)
            if x.shape[0]:
                collapse, energy = functional.collapse_and_energy(x)
                usable = all_finite(energy, collapse)
                collapse = collapse.to(self.last_collapse.dtype)
                self.last_collapse.copy_(torch.where(usable, collapse, self.last_collapse))
        self._calls_in_group += 1
        self.pending_calls.fill_(self._calls_in_group)

    def _pool(self) -> Pool:
        return Pool(self.pending_outer, self.pending_sum, self.pending_count)

    def _close_pool(self) -> None:
        """Fold the pool into ``F_hat``, and refresh on schedule."""
        with torch.no_grad(), _autocast_disabled(self.corr.device.type):
            pool = self._pool()
            result = fold_(self.corr, self.mean if self.center else None, self.num_updates, pool, self.rho)
            self.num_skipped.add_(result.skipped)
            self.num_empty.add_(~(result.folded | result.skipped))
            for buffer in pool:
                buffer.zero_()
            self._calls_in_group = 0
            self.pending_calls.zero_()
            self._steps += 1
            if self._steps % self.freq == 0:
                self._refresh(force=False)
            self._learn_counters()

    # ------------------------------------------------------------------ refresh
    def _refresh(self, force: bool) -> Tensor:
        changed = self.num_updates > (0 if force else self.refreshed_at)
        stats = normalise_statistics(self.effective_corr(), self.ridge)
        strategy = self.refresher
        if self._exact_next:
            strategy = getattr(self.refresher, "exact", self.refresher)
            self._exact_next = False
            self._exact_fallbacks += 1
        candidate, ok = strategy(stats, VARIANTS[self.variant], self.rule_options)
        candidate = candidate.to(self.weight.dtype)
        if self.weight_momentum:
            none = candidate.new_zeros(())  # in the weight's dtype: 0.9 in float32 is not 0.9
            momentum = torch.where(self.refreshed_at > 0, none + self.weight_momentum, none)
            candidate = momentum * self.weight.detach() + (1 - momentum) * candidate
        use = ok & changed
        weight = self.weight.detach()
        torch.where(use, candidate, weight, out=weight)  # in place: no dim x dim temporary
        self.refreshed_at.copy_(torch.where(use, self.num_updates, self.refreshed_at))
        self.refresh_rejections.add_((changed & ~ok).long())
        self._generation += 1
        return use

    @torch.no_grad()
    def refresh(self) -> bool:
        """Recompute ``W_p`` from the current estimate now; False if it was kept (reads the result)."""
        with _autocast_disabled(self.corr.device.type):
            return bool(self._refresh(force=True))

    def _learn_counters(self) -> None:
        """Warn and schedule an exact refresh from the newest counters that reached the host."""
        previous = self._lagged.exchange(torch.stack([self.num_skipped, self.refresh_rejections]))
        if previous is not None:
            skipped, rejections = previous
            if skipped > self._seen_skipped:
                self._seen_skipped = skipped
                self._warn_once(
                    "nonfinite",
                    "DirectPredHead skipped a training step whose statistics were non-finite (NaN/inf in a "
                    "batch, or sums that overflowed); its statistics and W_p are unchanged. Further skips "
                    "are counted in `num_skipped` without warning.",
                )
            if rejections > self._seen_rejections:
                self._seen_rejections = rejections
                self._exact_next = True
                self._warn_once(
                    "refresh",
                    "DirectPredHead could not use a refresh (eigendecomposition failed in the statistics' "
                    "dtype and in float64, or an iterative result exceeded its error bound); keeping the "
                    "previous W_p. Counted in `refresh_rejections`; the next refresh uses the exact rule.",
                )

    def effective_corr(self) -> Tensor:
        """The matrix ``W_p`` is computed from: ``F_hat``, or ``F_hat - mu mu^T`` with ``center``."""
        if self.center:
            return self.corr - torch.outer(self.mean, self.mean)
        return self.corr

    # ------------------------------------------------------------- diagnostics
    @torch.no_grad()
    def spectra(self) -> Dict[str, Tensor]:
        """Eigenvalues (descending, float64) of ``F_hat`` and of the symmetric part of ``W_p``."""
        corr = self.effective_corr().to(torch.float64)
        weight = self.weight.detach().to(torch.float64)
        weight = (weight + weight.mT) / 2
        return {
            "corr": torch.linalg.eigvalsh(corr).flip(0),
            "weight": torch.linalg.eigvalsh(weight).flip(0),
        }

    @torch.no_grad()
    def alignment(self) -> float:
        """Eigenspace alignment of ``W_p`` with ``F_hat`` (see :func:`functional.eigenspace_alignment`)."""
        if int(self.num_updates) == 0:
            return float("nan")
        return float(functional.eigenspace_alignment(self.weight, self.effective_corr()))

    @torch.no_grad()
    def diagnostics(self) -> Dict[str, float]:
        """Scalar summaries for logging: spectra, alignment, collapse indicator and counters.

        Computed on demand (one eigendecomposition of each matrix in float64, and host reads),
        so call it every N steps rather than every step at large ``dim``.
        """
        spectra = self.spectra()
        corr_eigs, weight_eigs = spectra["corr"], spectra["weight"]
        updates = int(self.num_updates)
        return {
            "alignment": self.alignment(),
            "collapse": float(self.last_collapse),
            "corr_eig_max": float(corr_eigs[0]),
            "corr_eig_min": float(corr_eigs[-1]),
            "corr_effective_rank": float(functional.effective_rank(corr_eigs)) if updates else float("nan"),
            "weight_eig_max": float(weight_eigs[0]),
            "weight_eig_min": float(weight_eigs[-1]),
            "num_updates": float(updates),
            "num_skipped": float(self.num_skipped),
            "num_steps": float(self._steps),
            "refresh_failures": float(self.refresh_rejections),
            "refresh_fallbacks": float(self._exact_fallbacks),
        }

    # ------------------------------------------------------------ bookkeeping
    def _check_input(self, z: Tensor) -> None:
        if not isinstance(z, Tensor):
            raise TypeError(f"DirectPredHead expects a torch.Tensor of shape (batch, {self.dim}), got {type(z).__name__}")
        if z.dim() != 2 or z.shape[1] != self.dim:
            raise ValueError(
                f"DirectPredHead(dim={self.dim}) expects input of shape (batch, {self.dim}), "
                f"got {tuple(z.shape)}"
            )
        if not z.is_floating_point():
            raise ValueError(f"DirectPredHead expects a floating-point input, got {z.dtype}")

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=2)

    def _apply(self, fn, recurse=True):
        # Statistics (and a buffer W_p) keep their dtype through .half()/.to(dtype): only
        # their device follows the module.
        before = {name: getattr(self, name) for name in self._pinned}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = getattr(self, name)
            if new.dtype != old.dtype:
                setattr(self, name, old.to(device=new.device))
        self._snapshot = None
        self._lagged = _LaggedCounters()
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # meaningful only for an open "auto" pool; otherwise always False, so equal states save equal
        self.pending_closed.fill_(self._backward_seen and self._calls_in_group > 0 and self._pool_calls is None)
        super()._save_to_state_dict(destination, prefix, keep_vars)
        # Next to the version, in the state_dict's metadata, so a load can refuse a
        # checkpoint of another configuration before copying anything.
        metadata = getattr(destination, "_metadata", None)
        if metadata is not None:
            metadata.setdefault(prefix[:-1], {}).update(dim=self.dim, variant=self.variant)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        for key in ("dim", "variant"):
            if key in local_metadata and local_metadata[key] != getattr(self, key):
                raise RuntimeError(
                    f"cannot load a DirectPredHead checkpoint with {key}={local_metadata[key]!r} into a head with "
                    f"{key}={getattr(self, key)!r} ({prefix or 'the head'}); build the head with the "
                    "checkpoint's settings."
                )
        weight = state_dict.get(prefix + "weight")
        if isinstance(weight, Tensor) and weight.shape != self.weight.shape:
            raise RuntimeError(
                f"cannot load a DirectPredHead checkpoint with dim={weight.shape[-1]} into a head with "
                f"dim={self.dim} ({prefix or 'the head'})."
            )
        self._fill_optional_state(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        self._reset_host_state()
        self._generation = 1  # W_p was overwritten: snapshots of the old one are stale

    def _fill_optional_state(self, state_dict: Dict[str, Any], prefix: str) -> None:
        """Make checkpoints of version 1 and of other refresh strategies load.

        Version 1 had no pool buffers when ``calls_per_update == 1``, no step and refresh
        counters, and kept an optional warm start in the refresh strategy; the first version 2
        had no ``pending_closed``. None of it is needed to continue exactly: pools start
        empty (or, if open, belong to a finished step), ``refreshed_at`` is ``num_updates``,
        and a strategy's own state (another strategy's warm start, auto's measured choice)
        is dropped or re-derived. The state everything depends on stays required.
        """
        own = self.state_dict(prefix=prefix, keep_vars=True)
        for key in [k for k in state_dict if k.startswith(prefix + "refresher.") and k not in own]:
            del state_dict[key]
        updates = state_dict.get(prefix + "num_updates")
        for key, value in own.items():
            name = key[len(prefix):]
            if key in state_dict or not (name in _OPTIONAL_STATE or name.startswith(("pending_", "refresher."))):
                continue
            if name == "refreshed_at" and isinstance(updates, Tensor):
                state_dict[key] = updates.clone()
            elif name == "pending_closed" and isinstance(state_dict.get(prefix + "pending_calls"), Tensor):
                # checkpoints are saved between steps: an open pool is a finished step's
                state_dict[key] = (state_dict[prefix + "pending_calls"] > 0).to(value.device)
            elif name.startswith("pending_") or name == "num_empty":
                state_dict[key] = torch.zeros_like(value)
            else:
                state_dict[key] = value.detach().clone() if isinstance(value, Tensor) else value

    def __getstate__(self):
        # Pickling (torch.save of a whole model, copy.deepcopy) drops the host caches.
        state = super().__getstate__().copy()
        state.update(_snapshot=None, _lagged=_LaggedCounters())
        return state

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, variant={self.variant!r}, rho={self.rho}, eps={self.eps}, "
            f"freq={self.freq}, calls_per_update={self.calls_per_update!r}, trainable={self.trainable}, "
            f"refresh={self.refresh_strategy!r}"
        )


def _all_reduce_pool_(pool: Pool, group: Optional[Any]) -> None:
    """One collective for the whole pool: ``[outer | total | count]``."""
    dim = pool.total.shape[0]
    packed = torch.cat([pool.outer.flatten(), pool.total, pool.rows.reshape(1)])
    all_reduce_sum_(packed, group)
    pool.outer.copy_(packed[: dim * dim].view(dim, dim))
    pool.total.copy_(packed[dim * dim : dim * dim + dim])
    pool.rows.copy_(packed[-1])


class _LaggedCounters:
    """Device counters on their way to the host, without waiting for the device.

    On the CPU they are read right away (that costs nothing). On an accelerator each update
    copies them to pinned memory with ``non_blocking=True`` and records an event; the next
    update reads that copy (by then the event has long completed, so waiting on it costs
    nothing) and issues a new one: the host learns them one update late. ``lagged=True``
    forces the accelerator behaviour on the CPU, for tests. Not pickled.
    """

    def __init__(self, lagged: Optional[bool] = None) -> None:
        self.lagged = lagged
        self._host: Optional[Tensor] = None
        self._event: Optional[Any] = None

    def exchange(self, counters: Tensor) -> Optional[List[int]]:
        """Send ``counters`` towards the host; return the newest values that arrived (or None)."""
        lagged = counters.device.type != "cpu" if self.lagged is None else self.lagged
        if not lagged:
            return counters.tolist()
        arrived = None
        if self._host is not None:
            if self._event is not None:
                self._event.synchronize()
            arrived = self._host.tolist()
        if counters.device.type == "cpu":
            self._host = counters.clone()
        else:
            if self._host is None or self._host.shape != counters.shape:
                self._host = torch.empty(counters.shape, dtype=counters.dtype, pin_memory=True)
            self._host.copy_(counters, non_blocking=True)
            self._event = torch.Event(device=counters.device)
            self._event.record()
        return arrived


def _check_int(name: str, value: Any, *, minimum: int, also: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}{' ' + also if also else ''}, got {value!r}")
    return int(value)


def _check_real(name: str, value: Any, lower: float, upper: float, *,
                lower_open: bool = False, upper_open: bool = False) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > lower if lower_open else value >= lower) and (value < upper if upper_open else value <= upper)
    if not ok:
        interval = f"{'(' if lower_open else '['}{lower:g}, {upper:g}{')' if upper_open else ']'}"
        raise ValueError(f"{name} must be a float in {interval}, got {value!r}")
    return float(value)


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
