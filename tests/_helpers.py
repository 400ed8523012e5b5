"""Shared test helpers: batches, one training-mode call, state snapshots and a tiny SimSiam step."""

import copy

import torch
from torch import nn

DIM = 8


def make_batches(n=12, batch=32, dim=DIM, seed=0, dtype=torch.float32):
    """``n`` correlated Gaussian batches (drawn in float64, then cast to ``dtype``)."""
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
    return [(torch.randn(batch, dim, generator=gen, dtype=torch.float64) @ mixing).to(dtype) for _ in range(n)]


def call(head, z):
    """One training-mode call, as a training step makes it (the input requires grad)."""
    return head(z.clone().requires_grad_(True))


def snapshot(head):
    """The head's whole saved state, copied (tensors cloned, extra state deep-copied)."""
    return {k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in head.state_dict().items()}


def assert_same_state(a, b, ignore=()):
    assert set(a) - set(ignore) == set(b) - set(ignore)
    for key in set(a) - set(ignore):
        assert _same(a[key], b[key]), key


def _same(a, b):
    """Equal values, tensors bit for bit, through the dicts and lists of extra state."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


class TinySimSiam(nn.Module):
    """SimSiam's step around a head under test: ``model(x0, x1) -> (loss, p0, p1)``, one module.

    Not the benchmarks' shared SimSiam (``benchmarks.methods.LightlySimSiam``): the head's
    tests compile, checkpoint and explain the whole step as one ``forward`` and reach into
    ``head`` and ``embed``, and ``test_sync``/``test_refresh`` run without lightly.
    """

    def __init__(self, head, dim=DIM):
        super().__init__()
        self.backbone = nn.Linear(12, 16)
        self.projector = nn.Linear(16, dim)
        self.head = head

    def embed(self, x):
        return self.projector(torch.relu(self.backbone(x)))

    def forward(self, x0, x1):
        z0, z1 = self.embed(x0), self.embed(x1)
        p0, p1 = self.head(z0), self.head(z1)
        loss = -(nn.functional.cosine_similarity(p0, z1.detach()).mean()
                 + nn.functional.cosine_similarity(p1, z0.detach()).mean()) / 2
        return loss, p0.detach(), p1.detach()


def views(step, device="cpu", batch=16):
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(batch, 12, generator=gen).to(device) for _ in range(2)]


def sgd_step(model, optimizer, x0, x1):
    loss, p0, p1 = model(x0, x1)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach(), p0, p1


def refuse(monkeypatch, *levels):
    """Make the iterative refresh refuse every candidate of ``levels`` (``"normal"``, ``"thorough"``).

    The candidate is computed as usual and marked unusable on the device, like a real refusal.
    """
    import directpred_plugin.head as head_module

    candidate = head_module.iterative_candidate

    def refusing(stats, variant, options, **settings):
        weight, ok = candidate(stats, variant, options, **settings)
        level = "normal" if settings.get("compute_dtype") is None else "thorough"
        return weight, (ok & False if level in levels else ok)

    monkeypatch.setattr(head_module, "iterative_candidate", refusing)


def record_levels(monkeypatch):
    """The level (``"normal"``, ``"thorough"``, ``"exact"``) of every refresh run from now on, in order.

    The level is the one the head's :class:`~directpred_plugin.steps.Steps` decided for the
    refresh, recorded when the head runs it (``refresh_weight_``).
    """
    from directpred_plugin import head as head_module
    from directpred_plugin.steps import LEVEL_NAMES, Steps

    levels = []
    decided = []
    refresh_level = Steps.refresh_level
    refresh_weight_ = head_module.refresh_weight_

    def deciding(self, *args, **kwargs):
        level = refresh_level(self, *args, **kwargs)
        decided.append(LEVEL_NAMES[level])
        return level

    def recording(*args, **kwargs):
        use = refresh_weight_(*args, **kwargs)
        levels.append(decided.pop())
        return use

    monkeypatch.setattr(Steps, "refresh_level", deciding)
    monkeypatch.setattr(head_module, "refresh_weight_", recording)
    return levels
