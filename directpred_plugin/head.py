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
        refresh: A key of :data:`directpred_plugin.REFRESH_STRATEGIES`; ``"exact"`` is a full
            eigendecomposition at every refresh.

    Robustness: a training batch containing NaN/inf (on any rank) updates nothing and
    warns once per head; if the eigendecomposition fails or is non-finite it is retried
    in float64, and if that fails the previous ``W_p`` is kept (with a warning).
    :meth:`state_dict` holds ``F_hat``, ``W_p`` and the update counter, so training
    resumed from a checkpoint continues exactly as if uninterrupted.

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
        refresh: str = "exact",
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
        self.refresher = REFRESH_STRATEGIES[refresh]()

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
        self.register_buffer("last_collapse", torch.full((), float("nan")), persistent=False)
        self._pinned.append("last_collapse")

        # Host-side copies of the counters: the schedule is decided in Python, and reading
        # a CUDA buffer for it every call would synchronise with the device.
        self._updates = 0
        self._pending_calls = 0
        self._pending_count = 0.0
        self._skipped = 0
        self._refresh_failures = 0
        self._warned: set = set()

    # ------------------------------------------------------------------ forward
    def forward(self, z: Tensor) -> Tensor:
        self._check_input(z)
        # A private copy of W_p: a refresh later in this call rewrites self.weight in
        # place, which must not touch the tensor autograd saved for backward.
        weight = self.weight.to(dtype=z.dtype, copy=True)
        with _autocast_disabled(z.device.type):
            out = F.linear(z, weight)
        if self.training and torch.is_grad_enabled():
            self.update(z)
        return out

    @torch.no_grad()
    def update(self, z: Tensor) -> None:
        """Fold a batch into ``F_hat`` (and refresh ``W_p`` on schedule) without computing output.

        :meth:`forward` calls this in training mode; call it directly to feed statistics
        from elsewhere. Collective under DDP: every rank must call it equally often.
        """
        self._check_input(z)
        with _autocast_disabled(z.device.type):
            x = z.detach().to(self.stats_dtype)
            outer, total, count, bad = self._reduced_batch_stats(x)
            if bad:
                self._skip_batch()
            else:
                self.last_collapse.copy_(functional.collapse_indicator(x))

        if self.calls_per_update == 1:
            if not bad and count > 0:
                self._fold(outer / count, total / count if self.center else None)
            return

        if not bad and count > 0:
            self.pending_outer.add_(outer)
            self.pending_sum.add_(total)
            self._pending_count += count
        self._pending_calls += 1
        if self._pending_calls == self.calls_per_update:
            if self._pending_count > 0:
                self._fold(
                    self.pending_outer / self._pending_count,
                    self.pending_sum / self._pending_count if self.center else None,
                )
            self.pending_outer.zero_()
            self.pending_sum.zero_()
            self._pending_calls = 0
            self._pending_count = 0.0
        self.pending_calls.fill_(self._pending_calls)
        self.pending_count.fill_(self._pending_count)

    def _reduced_batch_stats(self, x: Tensor):
        """Sum of outer products, sum of rows, row count and a bad-batch flag, over all ranks."""
        outer = functional.batch_outer_sum(x)
        total = x.sum(dim=0)
        finite = torch.isfinite(outer).all() & torch.isfinite(total).all()
        ranks = world_size(self.process_group) if self.sync_dist else 1
        if ranks == 1:
            return outer, total, float(x.shape[0]), not bool(finite)
        # One collective per call: [outer | total | count | bad]. A rank with a bad batch
        # contributes zeros and a flag, so every rank skips the same (global) batch.
        packed = torch.cat([outer.flatten(), total, x.new_tensor([x.shape[0], 0.0])])
        packed = torch.where(finite, packed, torch.zeros_like(packed))
        packed[-1] = (~finite).to(packed.dtype)
        all_reduce_sum_(packed, self.process_group)
        d = self.dim
        outer = packed[: d * d].view(d, d)
        total = packed[d * d : d * d + d]
        count, bad = packed[-2:].tolist()
        return outer, total, count, bad > 0

    def _fold(self, corr: Tensor, mean: Optional[Tensor]) -> None:
        if self._updates == 0:
            self.corr.copy_(corr)
            if mean is not None:
                self.mean.copy_(mean)
        else:
            self.corr.mul_(self.rho).add_(corr, alpha=1.0 - self.rho)
            if mean is not None:
                self.mean.mul_(self.rho).add_(mean, alpha=1.0 - self.rho)
        self._updates += 1
        self.num_updates.fill_(self._updates)
        if self._updates % self.freq == 0:
            self.refresh()

    def _skip_batch(self) -> None:
        self._skipped += 1
        self.num_skipped.fill_(self._skipped)
        self._warn_once(
            "nonfinite",
            "DirectPredHead skipped a training batch with non-finite values (NaN/inf); "
            "its statistics and W_p are unchanged. Further skips are counted in "
            "`num_skipped` without warning.",
        )

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
        if self._updates == 0:
            return float("nan")
        return float(functional.eigenspace_alignment(self.weight, self.effective_corr()))

    @torch.no_grad()
    def diagnostics(self) -> Dict[str, float]:
        """Scalar summaries for logging: spectra, alignment, collapse indicator and counters.

        Computed on demand (one eigendecomposition of each matrix in float64), so call it
        every N steps rather than every step at large ``dim``.
        """
        spectra = self.spectra()
        corr_eigs, weight_eigs = spectra["corr"], spectra["weight"]
        return {
            "alignment": self.alignment(),
            "collapse": float(self.last_collapse),
            "corr_eig_max": float(corr_eigs[0]),
            "corr_eig_min": float(corr_eigs[-1]),
            "corr_effective_rank": float(functional.effective_rank(corr_eigs))
            if self._updates
            else float("nan"),
            "weight_eig_max": float(weight_eigs[0]),
            "weight_eig_min": float(weight_eigs[-1]),
            "num_updates": float(self._updates),
            "num_skipped": float(self._skipped),
            "refresh_failures": float(self._refresh_failures),
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
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _apply(self, fn, recurse=True):
        # Statistics (and a buffer W_p) keep their dtype through .half()/.to(dtype):
        # only their device follows the module.
        before = {name: getattr(self, name) for name in self._pinned}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = getattr(self, name)
            if new.dtype != old.dtype:
                setattr(self, name, old.to(device=new.device))
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._updates = int(self.num_updates)
        self._skipped = int(self.num_skipped)
        if self.calls_per_update > 1:
            self._pending_calls = int(self.pending_calls)
            self._pending_count = float(self.pending_count)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, variant={self.variant!r}, rho={self.rho}, eps={self.eps}, "
            f"freq={self.freq}, trainable={self.trainable}, refresh={self.refresh_strategy!r}"
        )


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
