import copy

import pytest
import torch
from torch import nn

from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import BYOLProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum

from directpred_plugin import DirectPredHead
from directpred_plugin.losses import IsoLoss, symmetric_psd_sqrt

DIM = 8


def warmed_head(seed=0, **kwargs):
    """A head whose W_p is no longer the identity (anisotropic input), then frozen in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    head = DirectPredHead(DIM, **kwargs)
    scales = torch.linspace(0.2, 2.0, DIM)
    for _ in range(5):
        head(torch.randn(64, DIM, generator=gen) * scales)
    return head.eval()


def batch(seed=1, n=16):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, DIM, generator=gen, requires_grad=True)
    z_target = torch.randn(n, DIM, generator=gen, requires_grad=True)
    return z, z_target


def test_l2_gradient_is_prediction_error_and_target_gets_none():
    head = warmed_head()
    assert not torch.allclose(head.weight, torch.eye(DIM), atol=0.05)
    z, z_target = batch()
    p = head(z)
    loss = IsoLoss(head, form="l2")(z, p, z_target)
    loss.backward()
    n = len(z)
    torch.testing.assert_close(z.grad, 2 * (p - z_target).detach() / n)
    assert z_target.grad is None
    torch.testing.assert_close(loss, (p - z_target).pow(2).sum(dim=1).mean())


def test_l2_with_a_training_head_also_stops_the_gradient_through_the_prediction():
    head = DirectPredHead(DIM)
    z, z_target = batch(seed=2)
    p = head(z)  # training mode: folds the batch and refreshes W_p; the l2 form never reads it
    IsoLoss(head, form="l2")(z, p, z_target).backward()
    torch.testing.assert_close(z.grad, 2 * (p - z_target).detach() / len(z))


def test_cosine_gradient_in_z_is_the_cosine_gradient_in_p():
    head = warmed_head()
    z, z_target = batch(seed=3)
    p = head(z)
    loss = IsoLoss(head)(z, p, z_target)
    loss.backward()

    p_leaf = p.detach().requires_grad_(True)
    NegativeCosineSimilarity()(p_leaf, z_target.detach()).backward()
    torch.testing.assert_close(z.grad, p_leaf.grad, rtol=1e-5, atol=1e-7)
    assert z_target.grad is None


def test_cosine_value_equals_negative_cosine_similarity():
    head = warmed_head()
    z, z_target = batch(seed=4)
    p = head(z)
    torch.testing.assert_close(IsoLoss(head)(z, p, z_target), NegativeCosineSimilarity()(p, z_target))


def test_isotropic_versus_standard_gradient():
    """The standard loss hands z the gradient at p times W_p; IsoLoss hands it unscaled."""
    head = warmed_head()
    z, z_target = batch(seed=5)
    p = head(z)
    standard = torch.autograd.grad(NegativeCosineSimilarity()(p, z_target), z, retain_graph=True)[0]
    iso = torch.autograd.grad(IsoLoss(head)(z, p, z_target), z)[0]
    torch.testing.assert_close(standard, iso @ head.weight.T, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(standard, iso, atol=1e-4)


def test_works_with_any_module_with_a_square_frozen_weight():
    linear = nn.Linear(DIM, DIM, bias=False).requires_grad_(False)
    with torch.no_grad():
        a = torch.randn(DIM, DIM)
        linear.weight.copy_(a @ a.T / DIM)
    z, z_target = batch(seed=6)
    p = linear(z)
    IsoLoss(linear)(z, p, z_target).backward()
    p_leaf = p.detach().requires_grad_(True)
    NegativeCosineSimilarity()(p_leaf, z_target.detach()).backward()
    torch.testing.assert_close(z.grad, p_leaf.grad, rtol=1e-4, atol=1e-7)
    assert linear.weight.grad is None  # W_p's root is a statistic: no gradient into the head


TRAINED_WEIGHT = r"IsoLoss needs a head whose weight is not trained.*W_p would get no gradient"


@pytest.mark.parametrize("make_head", [
    lambda: DirectPredHead(DIM, trainable=True, freq=2),  # the paper's hybrid
    lambda: nn.Linear(DIM, DIM, bias=False),
], ids=["trainable-directpred", "linear"])
def test_a_head_whose_weight_is_trained_is_refused(make_head):
    with pytest.raises(ValueError, match=TRAINED_WEIGHT):
        IsoLoss(make_head())


@pytest.mark.parametrize("form", ["cosine", "l2"])
def test_a_weight_made_trainable_after_construction_is_refused_at_the_call(form):
    head = DirectPredHead(DIM)
    loss = IsoLoss(head, form=form)
    z, z_target = batch(seed=7)
    p = head(z)
    loss(z, p, z_target)  # fine while W_p is a statistic
    head.weight.requires_grad_(True)
    with pytest.raises(ValueError, match=TRAINED_WEIGHT):
        loss(z, p, z_target)


def test_half_precision_inputs_and_weight():
    head = warmed_head().to(torch.bfloat16)
    z, z_target = batch(seed=7)
    z = z.detach().to(torch.bfloat16).requires_grad_(True)
    p = head(z)
    loss = IsoLoss(head)(z, p, z_target.to(torch.bfloat16))
    loss.backward()
    assert loss.dtype == torch.bfloat16 and torch.isfinite(z.grad.float()).all()


def test_symmetric_psd_sqrt_symmetrises_and_clamps():
    w = torch.tensor([[4.0, 2.0], [0.0, -9.0]], dtype=torch.float64)
    root = symmetric_psd_sqrt(w)
    eigvals, eigvecs = torch.linalg.eigh(0.5 * (w + w.T))
    expected = eigvecs @ torch.diag(eigvals.clamp_min(0).sqrt()) @ eigvecs.T
    torch.testing.assert_close(root, expected)
    torch.testing.assert_close(root, root.T)
    assert root.dtype == torch.float64


def test_validation_errors():
    head = DirectPredHead(DIM)
    with pytest.raises(ValueError, match="form"):
        IsoLoss(head, form="mse")
    with pytest.raises(ValueError, match="square"):
        IsoLoss(nn.Linear(DIM, DIM + 1))
    with pytest.raises(ValueError, match="square"):
        IsoLoss(nn.ReLU())
    loss = IsoLoss(head)
    z = torch.randn(4, DIM)
    with pytest.raises(ValueError, match="n x 8"):
        loss(z, z, torch.randn(5, DIM))
    with pytest.raises(ValueError, match="n x 8"):
        loss(torch.randn(4, DIM + 1), torch.randn(4, DIM + 1), torch.randn(4, DIM + 1))


@pytest.mark.parametrize("form", ["cosine", "l2"])
def test_lightly_byol_training_step(form):
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(12, 16), nn.ReLU())
    projection_head = BYOLProjectionHead(16, 32, DIM)
    prediction_head = DirectPredHead(DIM)  # "auto": one update per optimizer step, both views pooled
    backbone_momentum = copy.deepcopy(backbone)
    projection_head_momentum = copy.deepcopy(projection_head)
    deactivate_requires_grad(backbone_momentum)
    deactivate_requires_grad(projection_head_momentum)
    criterion = IsoLoss(prediction_head, form=form)
    params = list(backbone.parameters()) + list(projection_head.parameters())
    optimizer = torch.optim.SGD(params, lr=0.05)

    for step in range(3):
        x0, x1 = torch.randn(32, 12), torch.randn(32, 12)
        update_momentum(backbone, backbone_momentum, m=0.99)
        update_momentum(projection_head, projection_head_momentum, m=0.99)
        z0, z1 = projection_head(backbone(x0)), projection_head(backbone(x1))
        p0, p1 = prediction_head(z0), prediction_head(z1)
        # IsoLoss reads head.weight: under "auto" it is the W_p both calls of the step used
        torch.testing.assert_close(p0, z0 @ prediction_head.weight.T)
        torch.testing.assert_close(p1, z1 @ prediction_head.weight.T)
        t0 = projection_head_momentum(backbone_momentum(x0)).detach()
        t1 = projection_head_momentum(backbone_momentum(x1)).detach()
        loss = 0.5 * (criterion(z0, p0, t1) + criterion(z1, p1, t0))
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        grads = [p.grad for p in projection_head.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert sum(g.abs().sum() for g in grads) > 0
        assert prediction_head.num_updates.item() == step  # the backward pass alone ends no step
        optimizer.step()
        assert prediction_head.num_updates.item() == step + 1
    assert prediction_head.num_updates.item() == 3
    assert (prediction_head.weight - torch.eye(DIM)).abs().max() > 0.01
