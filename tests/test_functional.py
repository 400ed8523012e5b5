import math

import numpy as np
import pytest
import torch

from _reference import directcopy_matrix, directpred_matrix
from directpred_plugin import (
    VARIANTS,
    collapse_indicator,
    directcopy_weight,
    directpred_weight,
    eigenspace_alignment,
)
from directpred_plugin.functional import effective_rank


def random_psd(dim, rank=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, rank or dim, generator=gen, dtype=torch.float64)
    return a @ a.T / dim


@pytest.mark.parametrize("rank", [None, 3])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_weights_match_numpy_restatement(rank, eps):
    corr = random_psd(12, rank)
    # sqrt amplifies round-off in a null space (~1e-16) to ~1e-8
    atol = 1e-10 if rank is None else 1e-7
    np.testing.assert_allclose(directpred_weight(corr, eps).numpy(), directpred_matrix(corr.numpy(), eps), atol=atol)
    np.testing.assert_allclose(directcopy_weight(corr, eps).numpy(), directcopy_matrix(corr.numpy(), eps), atol=1e-12)


def test_directpred_properties():
    corr = random_psd(10)
    w = directpred_weight(corr, 0.05)
    assert torch.allclose(w, w.T)
    eig = torch.linalg.eigvalsh(w)
    assert eig.max() == pytest.approx(1.05) and eig.min() >= 0.05 - 1e-12
    # W commutes with F and W^2 ~ F / lambda_max when eps = 0
    w0 = directpred_weight(corr, 0.0)
    torch.testing.assert_close(w0 @ w0, corr / torch.linalg.eigvalsh(corr).max())
    assert torch.allclose(w @ corr, corr @ w, atol=1e-10)


def test_scale_invariance_and_zero_matrix():
    corr = random_psd(6)
    for fn in VARIANTS.values():
        torch.testing.assert_close(fn(corr, 0.01), fn(corr * 1e3, 0.01))
        torch.testing.assert_close(fn(torch.zeros(6, 6), 0.2), 0.2 * torch.eye(6))


def test_eigenspace_alignment():
    corr = random_psd(16, seed=1)
    assert float(eigenspace_alignment(directpred_weight(corr, 0.01), corr)) == pytest.approx(1.0)
    assert float(eigenspace_alignment(corr, corr)) == pytest.approx(1.0)
    gen = torch.Generator().manual_seed(3)
    random_w = torch.randn(16, 16, generator=gen, dtype=torch.float64)
    score = float(eigenspace_alignment(random_w, corr))
    assert 0.0 <= score < 0.6
    # interpolating from random to aligned raises the score
    mixed = 0.5 * random_w / random_w.norm() + 0.5 * corr / corr.norm()
    assert score < float(eigenspace_alignment(mixed, corr)) < 1.0
    assert math.isnan(float(eigenspace_alignment(random_w, torch.zeros(16, 16))))


def test_collapse_indicator_bounds():
    gen = torch.Generator().manual_seed(0)
    isotropic = torch.randn(20000, 32, generator=gen)
    assert float(collapse_indicator(isotropic)) == pytest.approx(32**-0.5, rel=0.01)
    assert float(collapse_indicator(isotropic)) <= 32**-0.5
    collapsed = torch.randn(1, 32, generator=gen).repeat(64, 1) * torch.rand(64, 1, generator=gen)
    assert float(collapse_indicator(collapsed)) == pytest.approx(0.0, abs=1e-6)
    assert float(collapse_indicator(isotropic[:1])) == 0.0


def test_effective_rank():
    assert float(effective_rank(torch.ones(5))) == pytest.approx(5.0)
    assert float(effective_rank(torch.tensor([1.0, 0, 0, 0]))) == pytest.approx(1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_collapse_indicator_is_the_population_std_of_normalised_rows(dtype):
    gen = torch.Generator().manual_seed(1)
    z = (torch.randn(37, 24, generator=gen) * torch.rand(37, 1, generator=gen) + 0.3).to(dtype)
    rows = z.double().numpy()
    rows = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    expected = rows.std(axis=0).mean()
    assert float(collapse_indicator(z)) == pytest.approx(expected, rel=1e-5)
    # the caller's tensor is never written to
    before = z.clone()
    collapse_indicator(z)
    assert torch.equal(z, before)
