"""The matrix-product predictors of "The Edge of Orthogonality" against independent re-statements.

Each iterate is a polynomial in Sigma (stiefel: in Sigma^T Sigma, times Sigma^T), so the
result is ``U diag(g_n(lambda)) U^T`` with ``g_n`` the same recursion on one eigenvalue.
The tests pin (a) the torch functions to the NumPy float64 iterations in ``_reference``,
(b) to ``U diag(g_n) U^T`` from ``numpy.linalg.eigh``, and (c) to the exact spectral
function ``g`` within ``max |g_n - g|`` over the spectrum, the error the step count leaves.
"""

import numpy as np
import pytest
import torch

import _reference as ref
from directpred_plugin.variants import (
    neumann_predictor,
    newton_schulz_fourth_root,
    newton_schulz_sqrt,
    stiefel_predictor,
    visser_sqrt,
)

MATMUL_PREDICTORS = {"ns": newton_schulz_sqrt, "ns2": newton_schulz_fourth_root, "stiefel": stiefel_predictor,
                     "visser": visser_sqrt}

REFERENCES = {"ns": ref.ns_sqrt, "ns2": ref.ns_fourth_root, "stiefel": ref.stiefel, "visser": ref.visser}


def stiefel_limit(eigvals):
    return np.full_like(eigvals, 1.0 / np.sqrt(np.sum(eigvals**-2.0)))


LIMITS = {
    "ns": np.sqrt,
    "ns2": lambda s: s**0.25,
    "stiefel": stiefel_limit,  # polar factor of an SPD Sigma is I; scaled by 1/||Sigma^-1||_F
    "visser": np.sqrt,
}


def spd_with_spectrum(eigvals, seed=0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((len(eigvals), len(eigvals))))
    return (q * eigvals) @ q.T


def head_sigma(dim, rank=None, ridge=0.0, seed=0):
    """What the head passes in: a correlation divided by its largest absolute entry, plus ridge * I."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((4 * dim, rank or dim)) @ rng.standard_normal((rank or dim, dim))
    z *= np.linspace(0.2, 3.0, dim)
    corr = z.T @ z / len(z)
    return corr / np.abs(corr).max() + ridge * np.eye(dim)


def spectral_restatement(name, sigma):
    """``U diag(g_n(lambda)) U^T``: the reference iteration run on the eigenvalues alone."""
    eigvals, eigvecs = np.linalg.eigh(sigma)
    g_n = np.diag(REFERENCES[name](np.diag(eigvals)))
    return (eigvecs * g_n) @ eigvecs.T, eigvals, g_n


@pytest.mark.parametrize("name", sorted(MATMUL_PREDICTORS))
@pytest.mark.parametrize("rank, ridge", [(None, 0.0), (5, 0.0), (5, 0.01)])
def test_matches_numpy_iteration(name, rank, ridge):
    sigma = head_sigma(24, rank, ridge)
    got = MATMUL_PREDICTORS[name](torch.from_numpy(sigma)).numpy()
    want = REFERENCES[name](sigma)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-11 * np.abs(want).max())


@pytest.mark.parametrize("name", sorted(MATMUL_PREDICTORS))
@pytest.mark.parametrize("rank", [None, 5])
def test_is_the_scalar_recursion_on_each_eigenvalue(name, rank):
    sigma = head_sigma(24, rank, ridge=0.001, seed=1)
    want, _, _ = spectral_restatement(name, sigma)
    got = MATMUL_PREDICTORS[name](torch.from_numpy(sigma)).numpy()
    # eigh + products in float64; iterations amplify round-off by at most ~1e3 here
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10 * np.abs(want).max())


@pytest.mark.parametrize("name", sorted(MATMUL_PREDICTORS))
def test_converges_to_spectral_function_on_well_conditioned_sigma(name):
    eigvals = np.linspace(0.5, 1.5, 16)
    sigma = spd_with_spectrum(eigvals)
    got = MATMUL_PREDICTORS[name](torch.from_numpy(sigma)).numpy()
    _, lam, g_n = spectral_restatement(name, sigma)
    g = LIMITS[name](lam)
    iteration_error = np.abs(g_n - g).max()
    eigvecs = np.linalg.eigh(sigma)[1]
    exact = (eigvecs * g) @ eigvecs.T
    # The step count's error on this spectrum (a = lambda/||Sigma||_F >= 0.12): <= 2e-12 for
    # the Newton-Schulz members (quadratic once near 1), ~1e-2 for 9 Visser steps (linear,
    # rate 1 - sqrt(a)); plus float64 round-off.
    assert np.abs(got - exact).max() <= iteration_error + 1e-12
    if name != "visser":
        assert iteration_error < 1e-10


def test_visser_converges_to_sqrt_with_more_steps():
    eigvals = np.linspace(0.5, 1.5, 16)
    sigma = spd_with_spectrum(eigvals)
    nine = visser_sqrt(torch.from_numpy(sigma)).numpy()
    many = visser_sqrt(torch.from_numpy(sigma), steps=80).numpy()
    exact = spd_with_spectrum(np.sqrt(eigvals))
    assert np.abs(many - exact).max() < 1e-10
    assert np.abs(nine - exact).max() > 1e-4  # 9 steps are not converged: the test above is not vacuous


def test_stiefel_is_the_scaled_transposed_polar_factor_of_a_general_matrix():
    rng = np.random.default_rng(3)
    q1, _ = np.linalg.qr(rng.standard_normal((12, 12)))
    q2, _ = np.linalg.qr(rng.standard_normal((12, 12)))
    singular = np.linspace(0.6, 1.4, 12)
    sigma = (q1 * singular) @ q2.T
    got = stiefel_predictor(torch.from_numpy(sigma)).numpy()
    want = (q2 @ q1.T) / np.sqrt(np.sum(singular**-2.0))
    np.testing.assert_allclose(got, want, atol=1e-12)


@pytest.mark.parametrize("name", sorted(MATMUL_PREDICTORS))
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("rank", [None, 4])
def test_commutes_with_sigma(name, dtype, tol, rank):
    sigma = torch.from_numpy(head_sigma(32, rank, ridge=0.01, seed=2)).to(dtype)
    p = MATMUL_PREDICTORS[name](sigma)
    commutator = torch.linalg.matrix_norm(p @ sigma - sigma @ p)
    assert commutator <= tol * torch.linalg.matrix_norm(p) * torch.linalg.matrix_norm(sigma)


@pytest.mark.parametrize("name", sorted(MATMUL_PREDICTORS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_keeps_dtype_and_device_and_leaves_input_alone(name, dtype):
    sigma = torch.from_numpy(head_sigma(8)).to(dtype)
    before = sigma.clone()
    out = MATMUL_PREDICTORS[name](sigma)
    assert out.dtype == dtype and out.device == sigma.device and out.shape == sigma.shape
    assert torch.equal(sigma, before)
    meta = MATMUL_PREDICTORS[name](torch.eye(8, dtype=dtype, device="meta"))
    assert meta.device.type == "meta" and meta.dtype == dtype


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", sorted(MATMUL_PREDICTORS))
def test_cuda_matches_cpu(name):
    sigma = torch.from_numpy(head_sigma(16, ridge=0.01))
    cpu = MATMUL_PREDICTORS[name](sigma)
    cuda = MATMUL_PREDICTORS[name](sigma.cuda())
    assert cuda.device.type == "cuda"
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", sorted(MATMUL_PREDICTORS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "sigma",
    [
        torch.zeros(1, 1),
        torch.full((1, 1), 0.7),
        torch.zeros(6, 6),
        torch.ones(6, 6),  # rank 1, eigenvalues {6, 0, ...}: the largest the head's scaling allows
        torch.from_numpy(head_sigma(16, rank=2)).float(),
    ],
    ids=["dim1-zero", "dim1", "zero", "rank1-max", "rank2"],
)
def test_degenerate_inputs_stay_finite(name, dtype, sigma):
    out = MATMUL_PREDICTORS[name](sigma.to(dtype))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["ns", "ns2", "visser"])
def test_dim_one_is_the_scalar_root(name):
    power = 0.25 if name == "ns2" else 0.5
    out = MATMUL_PREDICTORS[name](torch.full((1, 1), 0.7, dtype=torch.float64), steps=60)
    assert out.item() == pytest.approx(0.7**power, rel=1e-12)


def test_rank_one_null_space():
    """Newton-Schulz members give a null direction zero; Visser keeps the gain its recursion has at 0."""
    sigma = torch.ones(6, 6, dtype=torch.float64)
    null = torch.tensor([1.0, -1.0, 0, 0, 0, 0], dtype=torch.float64) / 2**0.5
    for name, fn in MATMUL_PREDICTORS.items():
        gain = fn(sigma) @ null
        if name == "visser":
            # p <- p - eta p^2 from p_0 = 1/(2 eta) decays only like 1/(eta k): a floor like DirectPred's eps
            at_zero = ref.visser(np.diag([6.0, 0.0]))[1, 1]
            assert at_zero > 0.1
            torch.testing.assert_close(gain, at_zero * null, rtol=1e-12, atol=1e-12)
        else:
            assert torch.linalg.vector_norm(gain) < 1e-12


def test_runs_under_torch_compile_fullgraph():
    torch._dynamo.reset()
    compiled = torch.compile(newton_schulz_fourth_root, fullgraph=True, backend="eager")
    sigma = torch.from_numpy(head_sigma(8, ridge=0.01)).float()
    torch.testing.assert_close(compiled(sigma), newton_schulz_fourth_root(sigma))


@pytest.mark.parametrize("fn", [newton_schulz_sqrt, stiefel_predictor, visser_sqrt])
def test_rejects_non_square(fn):
    with pytest.raises(ValueError, match="square"):
        fn(torch.ones(3, 4))


def test_visser_rejects_bad_step_size():
    with pytest.raises(ValueError, match="step_size"):
        visser_sqrt(torch.eye(3), step_size=1.5)


def test_neumann_matches_numpy_and_the_exact_cut_error():
    rng = np.random.default_rng(4)
    # projections whose correlation is near the identity, where the expansion is meant to work
    z = rng.standard_normal((512, 16))
    z_target = z @ (np.eye(16) + 0.1 * rng.standard_normal((16, 16))) + 0.1 * rng.standard_normal((512, 16))
    got = neumann_predictor(torch.from_numpy(z), torch.from_numpy(z_target)).numpy()
    np.testing.assert_allclose(got, ref.neumann(z, z_target), atol=1e-12)
    corr, cross = z.T @ z / 512, z.T @ z_target / 512
    least_squares = np.linalg.solve(corr, cross)
    residual = np.eye(16) - corr
    np.testing.assert_allclose(least_squares - got, residual @ residual @ least_squares, atol=1e-12)
    assert np.linalg.norm(least_squares - got) < 0.1 * np.linalg.norm(least_squares)


def test_neumann_keeps_dtype_and_checks_shapes():
    z = torch.randn(10, 4)
    assert neumann_predictor(z, z).dtype == torch.float32
    with pytest.raises(ValueError, match="same shape"):
        neumann_predictor(z, torch.randn(10, 5))
