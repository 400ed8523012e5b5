"""The DirectPred predictor head."""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import functional
from .distributed import all_reduce_sum_, world_size
from .refresh import REFRESH_STRATEGIES

_STATS_DTYPES = (torch.float32, torch.float64)


def _autocast_disabled(device_type: str) -> contextlib.AbstractContextManager:
    try:
        return torch.autocast(device_type=device_type, enabled=False)
    except RuntimeError:  # a device type autocast does not know, so nothing to disable
        return contextlib.nullcontext()


class DirectPredHead(nn.Module):
    """Predictor set in closed form from the correlation of its input (DirectPred).

    Non-contrastive SSL (BYOL, SimSiam) avoids collapse because the predictor ``W_p``
    aligns with the eigenspace of the correlation ``F = E[z z^T]`` of its input [0].
    DirectPred sets ``W_p`` directly instead of learning it: it keeps an exponential
    moving average ``F_hat`` of batch correlations, eigendecomposes
    ``F_hat = U diag(s) U^T`` and uses ``W_p = U diag(p) U^T`` with
    ``p_j = sqrt(max(s_j, 0) / max_k s_k) + eps``. DirectCopy [1]
    (``variant="directcopy"``) uses ``W_p = F_hat / lambda_max(F_hat) + eps * I``.

    - [0]: Tian, Chen & Ganguli, "Understanding self-supervised learning dynamics
      without contrastive pairs", ICML 2021, https://arxiv.org/abs/2102.06810
    - [1]: Wang et al., "Towards demystifying representation learning with
      non-contrastive self-supervision", 2021, https://arxiv.org/abs/2110.04947

    Each training-mode call ``head(z)`` (module in ``train()`` mode, autograd enabled)
      1. returns ``z @ W_p^T`` computed with the current ``W_p`` (earlier calls only),
      2. folds the detached batch correlation ``C = z^T z / batch`` into the estimate:
         ``F_hat = C`` on the first update, then ``F_hat <- rho * F_hat + (1 - rho) * C``,
      3. on every ``freq``-th update, recomputes ``W_p`` from ``F_hat``.

    ``W_p`` starts as the identity. Calls in ``eval()`` mode or under ``torch.no_grad()``
    (inference, frozen models, the first pass of reentrant activation checkpointing)
    change no state.

    Per call versus per iteration: the paper makes one update per training iteration
    from the correlation of all views together. lightly's and solo-learn's BYOL/SimSiam
    call the predictor once per view, so with the default ``calls_per_update=1`` an
    iteration with ``V`` views makes ``V`` EMA steps (the effective per-iteration decay
    is ``rho ** V`` and later views weigh more) and counts ``V`` towards ``freq``. To get
    the paper's rule exactly, either pass all views in one call
    (``head(torch.cat(views))``) or set ``calls_per_update=V``: the ``V`` calls of an
    iteration then all use the same ``W_p``, their pooled correlation (that of the
    concatenated views) makes one EMA step, and ``freq`` counts iterations.

    Args:
        dim: Width of the input (and output); ``W_p`` is ``dim x dim``.
        rho: EMA decay of the correlation estimate (paper: 0.3).
        eps: Added to every ``p_j`` (DirectPred) or to the diagonal (DirectCopy) so that
            weak directions still receive gradient. The authors' documented setting,
            0.01, is the default; the paper explores values up to 0.1.
        freq: Recompute ``W_p`` every ``freq`` updates (paper: 1). With
            ``trainable=True`` and ``freq > 1`` the optimizer trains ``W_p`` between
            refreshes and each refresh overwrites it (the paper's hybrid).
        variant: A key of :data:`directpred_plugin.VARIANTS` (``"directpred"`` or
            ``"directcopy"``).
        trainable: Make ``W_p`` an ``nn.Parameter`` for the optimizer instead of a buffer.
        center: Use the covariance ``F_hat - mu_hat mu_hat^T`` (with an EMA ``mu_hat`` of
            the batch means, same ``rho``) instead of the raw correlation, as the authors'
            code does with its zero-mean option.
        calls_per_update: Pool this many consecutive training calls into one update (see
            above). A call whose batch is skipped still fills its slot, so groups stay
            aligned with the framework's iterations.
        stats_dtype: ``torch.float32`` (default) or ``torch.float64`` for ``F_hat`` and the
            eigendecomposition. Statistics never follow ``.half()``/``.to(dtype)``.
        sync_dist: When ``torch.distributed`` is initialised with more than one rank, sum
            the batch statistics over ranks before the EMA, so that every rank holds the
            ``F_hat`` and ``W_p`` a single process would get from the concatenated batch.
        process_group: Group for that reduction (default: the world).
        refresh: A key of :data:`directpred_plugin.REFRESH_STRATEGIES`: ``"exact"`` (a full
            eigendecomposition at every refresh, the reference), ``"iterative"`` (Lanczos
            for ``lambda_max`` plus a Newton-Schulz square root: matrix products only,
            self-checked against a bound on its error, exact fallback) or ``"auto"`` (the
            default: the faster of the two for the variant and device, see
            :class:`directpred_plugin.refresh.AutoRefresh`).
        refresh_options: Keyword options for the strategy, e.g. ``{"tol": 0.01}``.
        deferred_checks: Decide bad batches and failed refreshes on the device and read
            the outcome on the host one call later, so that a training step never waits
            for the accelerator. ``None`` (default): only for CUDA inputs.

    Robustness: a training batch containing NaN/inf (on any rank) updates nothing and
    warns once per head; if the eigendecomposition fails or is non-finite it is retried
    in float64, and if that fails the previous ``W_p`` is kept (with a warning).
    With deferred checks (CUDA) the state is left unchanged in the same way, but the
    warning, the refresh schedule and ``diagnostics()`` counters learn of a skipped batch
    one call later, and an iterative refresh that fails its own check keeps the previous
    ``W_p`` until the next call, which then recomputes it with the checked (exact
    fallback) path.
    :meth:`state_dict` holds ``F_hat``, ``W_p``, the update counter and the refresh
    strategy's warm start, so training resumed from a checkpoint continues exactly as if
    uninterrupted.

    Examples:
        >>> # BYOL with a closed-form predictor instead of the 256-4096-256 MLP
        >>> predictor = DirectPredHead(256)
        >>> p0, p1 = predictor(projector(backbone(x0))), predictor(projector(backbone(x1)))
        >>> predictor.diagnostics()["alignment"]  # 1.0 for the exact rule
    """

    weight: Tensor
    corr: Tensor
    num_updates: Tensor
    num_skipped: Tensor

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
        calls_per_update: int = 1,
        stats_dtype: torch.dtype = torch.float32,
        sync_dist: bool = True,
        process_group: Optional[Any] = None,
        refresh: str = "auto",
        refresh_options: Optional[Dict[str, Any]] = None,
        deferred_checks: Optional[bool] = None,
    ) -> None:
        super().__init__()
        _check_int("dim", dim, minimum=1)
        _check_int("freq", freq, minimum=1)
        _check_int("calls_per_update", calls_per_update, minimum=1)
        if not (isinstance(rho, (int, float)) and 0.0 <= rho < 1.0):
            raise ValueError(f"rho must be a float in [0, 1), got {rho!r}")
        if not (isinstance(eps, (int, float)) and math.isfinite(eps)):
            raise ValueError(f"eps must be a finite float, got {eps!r}")
        if variant not in functional.VARIANTS:
            raise ValueError(f"variant must be one of {sorted(functional.VARIANTS)}, got {variant!r}")
        if refresh not in REFRESH_STRATEGIES:
            raise ValueError(f"refresh must be one of {sorted(REFRESH_STRATEGIES)}, got {refresh!r}")
        if refresh_options is not None and not isinstance(refresh_options, dict):
            raise ValueError(f"refresh_options must be a dict of keyword options, got {refresh_options!r}")
        if deferred_checks not in (None, True, False):
            raise ValueError(f"deferred_checks must be None, True or False, got {deferred_checks!r}")
        if stats_dtype not in _STATS_DTYPES:
            raise ValueError(f"stats_dtype must be torch.float32 or torch.float64, got {stats_dtype!r}")

        self.dim = dim
        self.rho = float(rho)
        self.eps = float(eps)
        self.freq = freq
        self.variant = variant
        self.trainable = trainable
        self.center = center
        self.calls_per_update = calls_per_update
        self.stats_dtype = stats_dtype
        self.sync_dist = sync_dist
        self.process_group = process_group
        self.refresh_strategy = refresh
        self.refresh_options = dict(refresh_options or {})
        self.deferred_checks = deferred_checks
        try:
            self.refresher = REFRESH_STRATEGIES[refresh](dim, **self.refresh_options)
        except TypeError as err:
            raise ValueError(
                f"refresh_options {sorted(self.refresh_options)} are not all options of refresh={refresh!r}: {err}"
            ) from None

        # A buffer W_p is stored like the statistics; a trainable one follows the module dtype.
        eye = torch.eye(dim) if trainable else torch.eye(dim, dtype=stats_dtype)
        if trainable:
            self.weight = nn.Parameter(eye)
        else:
            self.register_buffer("weight", eye)
        self.register_buffer("corr", torch.zeros(dim, dim, dtype=stats_dtype))
        self._pinned = ["corr"] + ([] if trainable else ["weight"])
        if center:
            self.register_buffer("mean", torch.zeros(dim, dtype=stats_dtype))
            self._pinned.append("mean")
        if calls_per_update > 1:
            self.register_buffer("pending_outer", torch.zeros(dim, dim, dtype=stats_dtype))
            self.register_buffer("pending_sum", torch.zeros(dim, dtype=stats_dtype))
            self.register_buffer("pending_count", torch.zeros((), dtype=stats_dtype))
            self.register_buffer("pending_calls", torch.zeros((), dtype=torch.long))
            self._pinned += ["pending_outer", "pending_sum", "pending_count"]
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("num_skipped", torch.zeros((), dtype=torch.long))
        # iterative refreshes that failed their own check on the sync-free path
        self.register_buffer("refresh_rejections", torch.zeros((), dtype=torch.long), persistent=False)

        # Host-side copies of the counters: the schedule is decided in Python, and reading
        # a CUDA buffer for it every call would synchronise with the device.
        self._updates = 0
        self._pending_calls = 0
        self._pending_count = 0.0
        self._skipped = 0
        self._refresh_failures = 0
        self._warned: set = set()
        # With deferred checks the host issues folds without knowing whether the batch
        # was good; a lagged snapshot of the device counters tells it how many were lost.
        self._issued = 0
        self._lost = 0
        self._rejections_seen = 0
        self._lagged = _LaggedCounters()
        # Output copy of W_p (see _output_weight) and the lazily computed collapse indicator.
        self._applied: Optional[Tensor] = None
        self._applied_key: Optional[tuple] = None
        self._collapse_batch: Optional[Tensor] = None
        self._collapse_value = torch.full((), float("nan"))

    # ------------------------------------------------------------------ forward
    def forward(self, z: Tensor) -> Tensor:
        self._check_input(z)
        weight = self._output_weight(z.dtype)
        with _autocast_disabled(z.device.type):
            out = F.linear(z, weight)
        if self.training and torch.is_grad_enabled():
            self.update(z)
        return out

    def _output_weight(self, dtype: torch.dtype) -> Tensor:
        if self.trainable:  # part of the graph, so that the optimizer trains W_p
            return self.weight.to(dtype=dtype, copy=True)
        # A private copy of W_p: a refresh later in this call (or in the next view's call,
        # before backward) rewrites self.weight in place, which must not touch the tensor
        # autograd saved. The copy is remade only when W_p changed (_version counts
        # in-place writes), i.e. once per refresh instead of once per call.
        w = self.weight
        key = (id(w), w.data_ptr(), w._version, w.device, dtype)
        if self._applied is None or self._applied_key != key:
            self._applied = w.detach().to(dtype=dtype, copy=True)
            self._applied_key = key
        return self._applied

    @torch.no_grad()
    def update(self, z: Tensor) -> None:
        """Fold a batch into ``F_hat`` (and refresh ``W_p`` on schedule) without computing output.

        :meth:`forward` calls this in training mode; call it directly to feed statistics
        from elsewhere. Collective under DDP: every rank must call it equally often.
        """
        self._check_input(z)
        deferred = self._defers(z.device)
        if deferred:
            self._read_lagged()
        with _autocast_disabled(z.device.type):
            x = z.detach().to(self.stats_dtype)
            ranks = world_size(self.process_group) if self.sync_dist else 1
            if deferred:
                self._update_on_device(x, ranks)
                counters = torch.stack([self.num_updates, self.num_skipped, self.refresh_rejections])
                self._lagged.offer(counters, self._issued)
            else:
                self._update_on_host(x, ranks)

    def _defers(self, device: torch.device) -> bool:
        if self.deferred_checks is None:
            return device.type == "cuda"
        return self.deferred_checks

    # ---- host-checked path: decisions read on the host right away (CPU default)
    def _update_on_host(self, x: Tensor, ranks: int) -> None:
        if ranks == 1:
            # NaN/inf anywhere in x, or an overflowing x^T x, shows on its diagonal
            ok = bool(torch.isfinite(x.square().sum(dim=0)).all())
            outer, total, count = None, None, float(x.shape[0])
        else:
            outer, total, count, bad = self._reduced_batch_stats(x)
            ok = not bad
        if not ok:
            self._skip_batch()
        else:
            self._collapse_batch = x

        if self.calls_per_update == 1:
            if ok and count > 0:
                self._fold_on_host(x, outer, total, count)
            return

        if ok and count > 0:
            if outer is None:
                self.pending_outer.addmm_(x.mT, x)
                self.pending_sum.add_(x.sum(dim=0))
            else:
                self.pending_outer.add_(outer)
                self.pending_sum.add_(total)
            self._pending_count += count
        self._pending_calls += 1
        if self._pending_calls == self.calls_per_update:
            if self._pending_count > 0:
                self._fold_on_host(None, self.pending_outer, self.pending_sum, self._pending_count)
            self.pending_outer.zero_()
            self.pending_sum.zero_()
            self._pending_calls = 0
            self._pending_count = 0.0
        self.pending_calls.fill_(self._pending_calls)
        self.pending_count.fill_(self._pending_count)

    def _reduced_batch_stats(self, x: Tensor):
        """Sum of outer products, sum of rows, row count and a bad-batch flag, over all ranks."""
        finite = torch.isfinite(x.square().sum(dim=0)).all()
        outer, total, count, bad = self._reduced_batch_stats_on_device(x, finite)
        count, bad = torch.stack([count, bad.to(count.dtype)]).tolist()
        return outer, total, count, bad > 0

    def _fold_on_host(self, x: Optional[Tensor], outer: Optional[Tensor], total: Optional[Tensor], count: float) -> None:
        """EMA step from the rows ``x`` (fused into one product) or from summed statistics."""
        first = self._updates == 0
        if outer is None:
            if first:
                torch.mm(x.mT, x, out=self.corr)
                self.corr.div_(count)
            else:
                self.corr.addmm_(x.mT, x, beta=self.rho, alpha=(1.0 - self.rho) / count)
            if self.center:
                total = x.sum(dim=0)
        elif first:
            torch.div(outer, count, out=self.corr)
        else:
            self.corr.mul_(self.rho).add_(outer, alpha=(1.0 - self.rho) / count)
        if self.center:
            if first:
                torch.div(total, count, out=self.mean)
            else:
                self.mean.mul_(self.rho).add_(total, alpha=(1.0 - self.rho) / count)
        self._updates += 1
        self._issued = self._updates
        self.num_updates.fill_(self._updates)
        if self._updates % self.freq == 0:
            self.refresh()

    def _skip_batch(self) -> None:
        self._skipped += 1
        self.num_skipped.fill_(self._skipped)
        self._warn_nonfinite()

    def _warn_nonfinite(self) -> None:
        self._warn_once(
            "nonfinite",
            "DirectPredHead skipped a training batch with non-finite values (NaN/inf); "
            "its statistics and W_p are unchanged. Further skips are counted in "
            "`num_skipped` without warning.",
        )

    # ---- deferred path: every decision stays on the device (CUDA default)
    def _update_on_device(self, x: Tensor, ranks: int) -> None:
        finite = torch.isfinite(x.square().sum(dim=0)).all()
        previous = self._collapse_value
        if previous.device != x.device:  # created in place: a host-to-device copy would wait
            previous = torch.full((), float("nan"), device=x.device)
        self._collapse_value = torch.where(finite, functional.collapse_indicator(x), previous)
        if ranks == 1:
            safe = torch.where(finite, x, torch.zeros((), dtype=x.dtype, device=x.device))
            outer = safe.mT @ safe
            total = safe.sum(dim=0)
            count = finite.to(x.dtype) * x.shape[0]
            skipped = ~finite
        else:
            outer, total, count, skipped = self._reduced_batch_stats_on_device(x, finite)
        self.num_skipped.add_(skipped.long())
        ok = count > 0

        if self.calls_per_update == 1:
            self._fold_on_device(outer, total, count, ok)
            return

        keep = ok.to(x.dtype)
        self.pending_outer.addcmul_(outer, keep)
        self.pending_sum.addcmul_(total, keep)
        self.pending_count.add_(count * keep)
        self._pending_calls += 1
        if self._pending_calls == self.calls_per_update:
            count = self.pending_count.clone()
            self._fold_on_device(self.pending_outer, self.pending_sum, count, count > 0)
            self.pending_outer.zero_()
            self.pending_sum.zero_()
            self.pending_count.zero_()
            self._pending_calls = 0
        self.pending_calls.fill_(self._pending_calls)

    def _reduced_batch_stats_on_device(self, x: Tensor, finite: Tensor):
        """Like :meth:`_reduced_batch_stats`, leaving the count and the flag on the device."""
        outer = functional.batch_outer_sum(x)
        total = x.sum(dim=0)
        # One collective per call: [outer | total | count | bad]. A rank with a bad batch
        # contributes zeros and a flag, so every rank skips the same (global) batch.
        rows = x.new_full((1,), x.shape[0])
        packed = torch.cat([outer.flatten(), total, rows, (~finite).to(x.dtype).reshape(1)])
        packed = torch.where(finite, packed, torch.zeros_like(packed))
        packed[-1] = (~finite).to(x.dtype)
        all_reduce_sum_(packed, self.process_group)
        d = self.dim
        bad = packed[-1] > 0
        count = packed[-2] * (~bad).to(x.dtype)
        return packed[: d * d].view(d, d), packed[d * d : d * d + d], count, bad

    def _fold_on_device(self, outer: Tensor, total: Tensor, count: Tensor, ok: Tensor) -> None:
        """EMA step whose coefficients are device tensors: (beta, alpha) = (1, 0) skips it."""
        first = self.num_updates == 0
        one = torch.ones((), dtype=self.corr.dtype, device=self.corr.device)
        zero = torch.zeros_like(one)
        beta = torch.where(ok, torch.where(first, zero, torch.full_like(one, self.rho)), one)
        alpha = torch.where(ok, torch.where(first, one, torch.full_like(one, 1.0 - self.rho)), zero)
        alpha = alpha / count.clamp_min(1)
        self.corr.mul_(beta).addcmul_(outer, alpha)
        if self.center:
            self.mean.mul_(beta).addcmul_(total, alpha)
        self.num_updates.add_(ok.long())
        self._issued += 1
        self._updates = self._issued - self._lost
        if self._updates % self.freq == 0:
            self._propose_refresh()

    def _propose_refresh(self) -> None:
        corr = self.effective_corr()
        with _autocast_disabled(corr.device.type):
            propose = getattr(self.refresher, "propose", None)
            proposal = propose(corr, self.variant, self.eps) if propose is not None else None
        if proposal is None:  # the strategy has no sync-free path
            self.refresh()
            return
        weight, ok = proposal
        self.weight.copy_(torch.where(ok, weight.to(self.weight.dtype), self.weight))
        self.refresh_rejections.add_((~ok).long())

    def _read_lagged(self) -> None:
        """Catch up with the device counters of an earlier call, if they have arrived."""
        snapshot = self._lagged.take()
        if snapshot is None:
            return
        (updates, skipped, rejections), issued = snapshot
        self._lost = issued - updates
        self._updates = self._issued - self._lost
        if skipped > self._skipped:
            self._skipped = skipped
            self._warn_nonfinite()
        if rejections > self._rejections_seen:
            self._rejections_seen = rejections
            self.refresh()  # the host-checked path, with its exact fallback

    # ------------------------------------------------------------------ refresh
    @torch.no_grad()
    def refresh(self) -> bool:
        """Recompute ``W_p`` from the current estimate now; returns False if it was kept."""
        corr = self.effective_corr()
        with _autocast_disabled(corr.device.type):  # autocast would run the matmuls in half
            weight = self.refresher(corr, self.variant, self.eps)
        if weight is None:
            self._refresh_failures += 1
            self._warn_once(
                "eigh",
                "DirectPredHead could not compute a finite W_p (eigendecomposition failed in "
                f"{self.stats_dtype} and float64); keeping the previous W_p.",
            )
            return False
        self.weight.copy_(weight)
        return True

    def effective_corr(self) -> Tensor:
        """The matrix ``W_p`` is computed from: ``F_hat``, or ``F_hat - mu mu^T`` with ``center``."""
        if self.center:
            return self.corr - torch.outer(self.mean, self.mean)
        return self.corr

    # ------------------------------------------------------------- diagnostics
    @property
    def last_collapse(self) -> Tensor:
        """Collapse indicator of the last good training batch (NaN before the first)."""
        if self._collapse_batch is not None:  # computed on demand: it is for logging only
            self._collapse_value = functional.collapse_indicator(self._collapse_batch)
            self._collapse_batch = None
        return self._collapse_value

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

        Computed on demand (one eigendecomposition of each matrix in float64), so call it
        every N steps rather than every step at large ``dim``. ``refresh_fallbacks``
        counts refreshes an iterative strategy handed to the exact rule.
        """
        spectra = self.spectra()
        corr_eigs, weight_eigs = spectra["corr"], spectra["weight"]
        updates = int(self.num_updates)
        fallbacks = sum(int(m.fallbacks) for m in self.refresher.modules() if hasattr(m, "fallbacks"))
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
            "refresh_failures": float(self._refresh_failures),
            "refresh_fallbacks": float(fallbacks + int(self.refresh_rejections)),
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
            warnings.warn(message, RuntimeWarning, stacklevel=4)

    def _apply(self, fn, recurse=True):
        # Statistics (and a buffer W_p, and the refresh strategy's state) keep their dtype
        # through .half()/.to(dtype): only their device follows the module.
        before = {name: getattr(self, name) for name in self._pinned}
        strategy = [(m, name, b) for m in self.refresher.modules() for name, b in m._buffers.items() if b is not None]
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = getattr(self, name)
            if new.dtype != old.dtype:
                setattr(self, name, old.to(device=new.device))
        for module, name, old in strategy:
            new = module._buffers[name]
            if new.dtype != old.dtype:
                module._buffers[name] = old.to(device=new.device)
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._updates = int(self.num_updates)
        self._issued = self._updates
        self._lost = 0
        self._skipped = int(self.num_skipped)
        self._lagged = _LaggedCounters()
        self._collapse_batch = None
        if self.calls_per_update > 1:
            self._pending_calls = int(self.pending_calls)
            self._pending_count = float(self.pending_count)

    def __getstate__(self):
        # Pickling (torch.save of a whole model, copy.deepcopy) drops the caches: the copy
        # of W_p is remade on first use, the last batch is reduced to its collapse value.
        self.last_collapse
        state = super().__getstate__().copy()
        state.update(_applied=None, _applied_key=None, _collapse_batch=None)
        return state

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, variant={self.variant!r}, rho={self.rho}, eps={self.eps}, "
            f"freq={self.freq}, trainable={self.trainable}, refresh={self.refresh_strategy!r}"
        )


class _LaggedCounters:
    """Device counters copied to the host without waiting, read once they have arrived.

    On CUDA the copy goes to pinned memory with ``non_blocking=True`` and an event marks
    its completion; a new copy is only issued after the previous one was read, so the
    host never reads a buffer that is still being written. Elsewhere the copy is
    immediate. Not pickled: a copied head starts without a pending snapshot.
    """

    def __init__(self) -> None:
        self._host: Optional[Tensor] = None
        self._event: Optional[Any] = None
        self._issued = 0
        self._pending = False

    def offer(self, counters: Tensor, issued: int) -> None:
        if self._pending:
            return
        if counters.device.type == "cuda":
            if self._host is None or self._host.shape != counters.shape:
                self._host = torch.empty(counters.shape, dtype=counters.dtype, pin_memory=True)
            self._host.copy_(counters, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = counters.detach().clone()
            self._event = None
        self._issued = issued
        self._pending = True

    def take(self):
        if not self._pending or (self._event is not None and not self._event.query()):
            return None
        self._pending = False
        return self._host.tolist(), self._issued

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
