"""Losses for training with a closed-form predictor."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_FORMS = ("cosine", "l2")


def symmetric_psd_sqrt(weight: Tensor) -> Tensor:
    """Square root of the symmetric part of ``weight``, negative eigenvalues clamped to 0.

    Example:
        >>> symmetric_psd_sqrt(torch.diag(torch.tensor([4.0, -1.0])))  # diag(2, 0)
    """
    sym = 0.5 * (weight + weight.mT)
    eigvals, eigvecs = torch.linalg.eigh(sym)
    return (eigvecs * eigvals.clamp_min(0).sqrt()) @ eigvecs.mT


def _refuse_trained_weight(weight: Tensor) -> None:
    if weight.requires_grad:
        raise ValueError(
            "IsoLoss needs a head whose weight is not trained (DirectPredHead with trainable=False, or "
            "a weight with requires_grad=False): IsoLoss hands the loss's gradient to z directly, so "
            "W_p would get no gradient and would never be trained"
        )


class IsoLoss(nn.Module):
    """Isotropic loss (IsoLoss) for a closed-form linear predictor.

    With ``p = z W_p`` and the usual loss between ``p`` and the target, the gradient
    reaching the projection ``z`` is ``W_p`` times the gradient at ``p``, so each
    eigenmode of ``W_p`` learns at a rate scaled by its eigenvalue. IsoLoss [0] keeps
    the loss's gradient at ``p`` but hands it to ``z`` directly, equalising the rates:

    - ``form="l2"``: ``mean_i ||z_i - sg(z_t,i + z_i - p_i)||^2`` (squared norm summed
      over features, mean over the batch). Its value is ``mean_i ||p_i - z_t,i||^2``
      and its gradient in ``z_i`` is ``2 (p_i - z_t,i) / n``.
    - ``form="cosine"`` (the authors' code, up to their factor 2, see below):
      ``-mean_i [ z_i . sg(z_t,i) / sg(||p_i|| ||z_t,i||)
      - 1/2 sg(p_i . z_t,i / (||p_i||^3 ||z_t,i||)) ||z_i W_p^(1/2)||^2 ]``,
      whose gradient in ``z_i`` is that of ``-cos(p_i, z_t,i) / n`` in ``p_i``.
      ``W_p^(1/2)`` is the PSD square root of the symmetric part of ``head.weight``
      (eigenvalues clamped at 0), computed without gradient: ``W_p`` is a statistic,
      not a parameter. A detached offset makes the value equal
      ``NegativeCosineSimilarity()(p, z_target)``, so logged curves stay comparable.

    ``z_target`` is always detached. The authors' cosine loss is ``-2 mean_i[...]``
    (solo-learn's BYOL loss ``2 - 2 cos``); this one matches lightly's
    ``NegativeCosineSimilarity`` (``-cos``), so it is a drop-in replacement there.

    The cosine form reads ``head.weight`` when the loss is called. With
    ``calls_per_update="auto"`` (the head's default) ``W_p`` is refreshed after the optimizer
    step, so ``p`` and the gradient use the same ``W_p``, as in the authors' code. With an
    integer ``calls_per_update`` a refresh may happen inside ``head(z)`` after ``p`` was
    computed, and the gradient is then taken with the refreshed ``W_p``.

    - [0]: Halvagal, Laborieux & Zenke, "Implicit variance regularization in
      non-contrastive SSL", NeurIPS 2023, https://neurips.cc/virtual/2023/poster/69901;
      code: https://github.com/fmi-basel/implicit-var-reg

    Args:
        head: The predictor; any module with a square ``.weight`` that maps ``z`` to
            ``p`` (e.g. `directpred_plugin.DirectPredHead`). The weight must not
            require grad (``trainable=False``): IsoLoss gives it no gradient.
        form: ``"cosine"`` or ``"l2"``.

    Examples:
        >>> # lightly's BYOL, replacing criterion = NegativeCosineSimilarity()
        >>> head = DirectPredHead(dim=256)
        >>> criterion = IsoLoss(head)
        >>> z0, z1 = projection_head(backbone(x0)), projection_head(backbone(x1))
        >>> p0, p1 = head(z0), head(z1)
        >>> t0, t1 = target_projection(x0).detach(), target_projection(x1).detach()
        >>> loss = 0.5 * (criterion(z0, p0, t1) + criterion(z1, p1, t0))
    """

    def __init__(self, head: nn.Module, form: str = "cosine") -> None:
        super().__init__()
        if form not in _FORMS:
            raise ValueError(f"form must be one of {_FORMS}, got {form!r}")
        weight = getattr(head, "weight", None)
        if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.shape[0] != weight.shape[1]:
            shape = tuple(weight.shape) if isinstance(weight, Tensor) else None
            raise ValueError(f"head must have a square .weight matrix, got {shape}")
        _refuse_trained_weight(weight)
        self.head = head
        self.form = form

    def forward(self, z: Tensor, p: Tensor, z_target: Tensor) -> Tensor:
        """Loss of the online projection ``z``, its prediction ``p`` and the other view's target.

        Args:
            z: ``n x dim`` online projection (the predictor's input).
            p: ``n x dim`` prediction ``head(z)``.
            z_target: ``n x dim`` target projection of the other view.

        Returns:
            Scalar loss.
        """
        dim = self._weight().shape[0]
        if z.dim() != 2 or z.shape[1] != dim or p.shape != z.shape or z_target.shape != z.shape:
            raise ValueError(
                f"z, p and z_target must all be n x {dim} (the head's width), got "
                f"{tuple(z.shape)}, {tuple(p.shape)} and {tuple(z_target.shape)}"
            )
        z_target = z_target.detach()
        if self.form == "l2":
            return (z - (z_target + z - p).detach()).pow(2).sum(dim=1).mean()
        return self._cosine(z, p, z_target)

    def _weight(self) -> Tensor:
        weight = self.head.weight
        assert isinstance(weight, Tensor)  # checked in __init__
        # again here: requires_grad can be switched on after construction (head.requires_grad_())
        _refuse_trained_weight(weight)
        return weight

    def _cosine(self, z: Tensor, p: Tensor, z_target: Tensor) -> Tensor:
        weight = self._weight().detach()
        if weight.dtype not in (torch.float32, torch.float64):  # eigh has no half-precision kernels
            weight = weight.float()
        with torch.no_grad():
            root = symmetric_psd_sqrt(weight).to(z.dtype)
        p = p.detach()
        p_norm = p.norm(dim=1)
        t_norm = z_target.norm(dim=1)
        pull = (z * z_target).sum(dim=1) / (p_norm * t_norm)
        cos = (p * z_target).sum(dim=1) / (p_norm * t_norm)
        # d||z W^(1/2)||^2 / dz = 2 z W = 2 p, so this term pushes along p with cos / ||p||^2.
        push = 0.5 * cos / p_norm.pow(2) * (z @ root).pow(2).sum(dim=1)
        iso = -(pull - push).mean()
        reported = -F.cosine_similarity(p, z_target, dim=1).mean()
        return iso + (reported - iso).detach()
