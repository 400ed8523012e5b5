"""Statistics with chosen spectra, realistic and adversarial, for the refresh and pipeline tests."""

import math

import torch

DIM = 24


def random_basis(dim, gen):
    return torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))[0]


def eigenvalues(kind, dim):
    index = torch.arange(1, dim + 1, dtype=torch.float64)
    return {
        "power-law": 1 / index,
        "steep": index**-2.5,
        "isotropic": torch.ones(dim, dtype=torch.float64),
        # a 4-fold top split by 1e-7 and a flat bulk: power iteration cannot separate them
        "near-degenerate-top": torch.where(index <= 4, 1.0, 1e-2) * (1 + 1e-7 * index),
        "top-gap-1e-3": torch.where(index == 1, 1.0, 0.999),
        "rank-deficient": (index <= 3).to(torch.float64),
        "vanishing-tail": index**-8.0,
    }[kind]


def matrix_with_spectrum(kind, dim=DIM, seed=0):
    basis = random_basis(dim, torch.Generator().manual_seed(seed))
    return (basis * eigenvalues(kind, dim)) @ basis.T


def batch_smaller_than_dim(dim=DIM, rows=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, dim, generator=gen, dtype=torch.float64) * torch.linspace(2, 0.5, dim, dtype=torch.float64)
    return x.T @ x / rows


def fixed_vectors(dim):
    """Directions a matrix-free method might start from: none may decide the result."""
    e0 = torch.zeros(dim, dtype=torch.float64)
    e0[0] = 1
    seeded = torch.randn(dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return {"ones": torch.ones(dim, dtype=torch.float64), "e0": e0, "seeded-randn": seeded}


def top_orthogonal_to(vector, dim=DIM, seed=1):
    """A spectrum whose top eigenvector is orthogonal to ``vector``, and which never maps
    ``vector`` out of the orthogonal complement of the top eigenvector (so a Krylov space
    started from ``vector`` never sees the top), with the second eigenvalue at 90%."""
    gen = torch.Generator().manual_seed(seed)
    v = vector / vector.norm()
    top = torch.randn(dim, generator=gen, dtype=torch.float64)
    top = top - (top @ v) * v
    top = top / top.norm()
    rest = torch.eye(dim, dtype=torch.float64) - torch.outer(top, top)
    bulk = rest @ torch.diag(torch.linspace(0.9, 0.01, dim, dtype=torch.float64)) @ rest
    bulk = (bulk + bulk.T) / 2
    return bulk + torch.outer(top, top)


ADVERSARIAL = {
    **{kind: (lambda kind=kind: matrix_with_spectrum(kind)) for kind in
       ["power-law", "steep", "isotropic", "near-degenerate-top", "top-gap-1e-3", "rank-deficient", "vanishing-tail"]},
    "batch-smaller-than-dim": batch_smaller_than_dim,
    **{f"top-orthogonal-to-{name}": (lambda v=v: top_orthogonal_to(v)) for name, v in fixed_vectors(DIM).items()},
}


def stream_with_statistics(matrix, steps, rows=None):
    """Batches whose correlation ``z^T z / rows`` is exactly ``matrix`` (up to rounding)."""
    values, vectors = torch.linalg.eigh(matrix.to(torch.float64))
    root = (vectors * values.clamp_min(0).sqrt()) @ vectors.T
    rows = rows or matrix.shape[-1]
    z = root.repeat(rows // matrix.shape[-1], 1) * math.sqrt(matrix.shape[-1])
    return [z.clone() for _ in range(steps)]
