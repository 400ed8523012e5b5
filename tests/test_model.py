"""Model-based test: random call sequences drive a head and a plain model of its documented contract.

A Hypothesis ``RuleBasedStateMachine`` draws a configuration (variant, refresh, freq,
calls_per_update, center, stats_dtype, trainable) and then any sequence of: training-mode
calls (inputs with or without grad, NaN/inf, empty, huge and tiny batches), backward passes
(full, ``inputs=``, ``torch.autograd.grad``, none), ``update(z)``, eval and no-grad calls,
non-reentrant and reentrant checkpointed calls, optimizer steps of a trainable ``W_p``,
save and load into a fresh head, deepcopy and dtype round trips. :class:`ContractModel`
restates the contract in NumPy float64 (steps, pools, folds, refresh timing, deferred
refreshes, which calls a recomputation may serve); after every rule the head must agree
with it: ``F_hat``, ``W_p`` (within the tolerance of its refresh strategy), the counters,
the outputs, the gradients, or the documented error.

Profiles: ``ci`` (the default) and ``long`` by hand::

    HYPOTHESIS_PROFILE=long python -m pytest tests/test_model.py
"""

import copy
import io
import math
import os
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from torch.utils.checkpoint import checkpoint

from _reference import RULES, directset_matrix
from directpred_plugin import DirectPredHead

settings.register_profile("ci", max_examples=60, stateful_step_count=25, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
settings.register_profile("long", max_examples=1500, stateful_step_count=40, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
settings.register_profile("debug", max_examples=200, stateful_step_count=25, deadline=None,
                          phases=[Phase.explicit, Phase.reuse, Phase.generate],
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
LR = 0.05

configurations = st.fixed_dictionaries({
    "dim": st.integers(2, 5),
    "variant": st.sampled_from(["directpred", "directcopy", "directset"]),
    "alpha": st.sampled_from([0.5, 0.75, 1.0, 2.0]),
    "rho": st.sampled_from([0.0, 0.3, 0.9]),
    "eps": st.sampled_from([0.0, 0.01, 0.2]),
    "freq": st.integers(1, 3),
    "calls_per_update": st.sampled_from([1, 2, 3, "auto", "auto"]),
    "center": st.booleans(),
    "stats_dtype": st.sampled_from([torch.float32, torch.float64]),
    "refresh": st.sampled_from(["exact", "iterative", "auto"]),
    "trainable": st.booleans(),
})

batches = st.fixed_dictionaries({
    "rows": st.sampled_from([0, 1, 2, 3, 7]),
    "scale": st.sampled_from(["normal"] * 6 + ["tiny", "huge", "underflow", "overflow"]),
    "poison": st.sampled_from([None] * 8 + ["nan", "inf"]),
    "seed": st.integers(0, 2**16),
    "requires_grad": st.sampled_from([True] * 4 + [False]),
})
SCALES = {
    torch.float32: {"normal": 1.0, "tiny": 1e-12, "huge": 1e12, "underflow": 1e-25, "overflow": 1e20},
    torch.float64: {"normal": 1.0, "tiny": 1e-100, "huge": 1e100, "underflow": 1e-170, "overflow": 1e160},
}


class ContractModel:
    """The head's documented behaviour, restated plainly (NumPy float64, no shortcuts)."""

    def __init__(self, config):
        self.c = config
        self.auto = config["calls_per_update"] == "auto"
        dim = config["dim"]
        self.F, self.mu, self.W = np.zeros((dim, dim)), np.zeros(dim), np.eye(dim)
        self.updates = self.skipped = self.steps = self.refreshed_at = 0
        self.pool = []
        self.boundary = self.deferred = False
        self.attempts = 0  # refreshes tried: a recomputation needs one W_p for the whole step
        self.step_attempts = []  # attempts seen by this step's calls
        self.untracked = 0  # training-mode calls without autograd in this step
        self.refreshed = False  # did the last operation refresh W
        self.refreshed_before_output = False

    # ------------------------------------------------------------------ the contract
    def begin_call(self):
        if not self.boundary:
            return
        self.boundary = False
        self.step_attempts, self.untracked = [], 0
        if self.deferred:
            self.deferred = False
            self.refresh()

    def backward_reached(self):
        """A backward pass reached the head: with "auto" the step's pool closes now."""
        self.boundary = True
        if self.auto and self.pool:
            self.close(in_step=True)

    def call(self, x, reachable):
        """A training-mode call; returns the W its output uses."""
        self.begin_call()
        self.refreshed_before_output = self.refreshed
        w = self.W.copy()
        self.step_attempts.append(self.attempts)
        if self.auto and not reachable:
            self.fold([x])
            self.end_step(in_step=False)
            return w
        self.pool.append(x)
        if not self.auto and len(self.pool) == self.c["calls_per_update"]:
            self.close(in_step=True)
        return w

    def update(self, x):
        self.begin_call()
        if self.auto:
            self.fold([x])
            self.end_step(in_step=False)
            return
        self.pool.append(x)
        if len(self.pool) == self.c["calls_per_update"]:
            self.close(in_step=False)

    def close(self, in_step):
        self.fold(self.pool)
        self.pool = []
        self.end_step(in_step)

    def fold(self, parts):
        rows = np.concatenate(parts) if parts else np.zeros((0, self.c["dim"]))
        info = torch.finfo(self.c["stats_dtype"])
        with np.errstate(all="ignore"):
            outer, total = rows.T @ rows, rows.sum(axis=0)
            if self.c["center"]:  # what must be representable is the covariance: moments about the
                # mean of the pool's first batch with rows, as documented
                shift = next((p.mean(axis=0) for p in parts if len(p)), self.mu)
                shifted = rows - shift
                check = (shifted.T @ shifted, shifted.sum(axis=0), shift)
            else:
                check = (outer, total)
        finite = all(np.isfinite(m).all() for m in check)
        too_big = finite and max(np.abs(m).max(initial=0) for m in check) > info.max
        largest = [np.abs(p).max() if p.size and np.isfinite(p).all() else 0.0 for p in parts]
        underflow = any(0 < m and m * m < info.tiny for m in largest)
        if not finite or too_big or underflow:
            self.skipped += 1
        elif len(rows):
            keep = 0.0 if self.updates == 0 else self.c["rho"]
            batch_mean = total / len(rows)
            if self.c["center"]:  # F_hat - mu mu^T by its own recurrence (no cancellation in the model)
                centred = rows - batch_mean
                delta = batch_mean - self.mu
                with np.errstate(all="ignore"):
                    cov = keep * self.F + (1 - keep) * centred.T @ centred / len(rows) \
                        + np.outer(keep * (1 - keep) * delta, delta)
                mu = self.mu + (1 - keep) * delta
                if not (np.isfinite(cov).all() and np.abs(cov).max() <= info.max):  # the result overflows
                    self.skipped += 1
                    return
                self.F, self.mu = cov, mu
            else:
                self.F = keep * self.F + (1 - keep) * outer / len(rows)
                self.mu = keep * self.mu + (1 - keep) * batch_mean
            self.updates += 1

    def end_step(self, in_step):
        self.steps += 1
        if self.steps % self.c["freq"] == 0:
            if in_step and self.c["trainable"]:
                self.deferred = True
            else:
                self.refresh()

    def refresh(self):
        self.attempts += 1
        if self.updates > self.refreshed_at:
            self.W = self.rule(self.target())
            self.refreshed_at = self.updates
            self.refreshed = True

    def target(self):
        """The matrix the rule reads: F_hat, or with center the covariance (kept in ``F``)."""
        return self.F

    def scale(self):
        """The magnitude rounding of the head's statistics is relative to."""
        scale = np.abs(self.F).max()
        if self.c["center"]:  # the covariance is formed next to mu: its rounding scales with mu too
            scale = max(scale, np.abs(self.mu).max() ** 2)
        return max(scale, np.finfo(np.float64).tiny)

    def rule(self, m):
        if self.c["variant"] == "directset":
            return directset_matrix(m, self.c["eps"], self.c["alpha"])
        return RULES[self.c["variant"]](m, self.c["eps"])

    def recomputable(self):
        return len(set(self.step_attempts)) <= 1 and not self.untracked and bool(self.step_attempts)


class HeadMachine(RuleBasedStateMachine):
    @initialize(config=configurations)
    def build(self, config):
        if config["variant"] != "directset":
            config["alpha"] = 0.5
        if config["trainable"] and config["freq"] == 1:
            config["freq"] = 2  # the head refuses trainable with freq=1 (test_options)
        if config["refresh"] == "iterative" and config["variant"] == "directset" and config["alpha"] not in (0.5, 1.0):
            config["refresh"] = "exact"  # no iterative form (refused, test_options)
        self.config = config
        self.options = {k: v for k, v in config.items() if k not in ("dim", "alpha")}
        if config["variant"] == "directset":
            self.options["alpha"] = config["alpha"]
        self.head = DirectPredHead(config["dim"], **self.options)
        self.model = ContractModel(config)
        self.optimizer = torch.optim.SGD(self.head.parameters(), lr=LR) if config["trainable"] else None
        self.pending = []  # (z, out, W used) of outputs no backward has consumed yet
        self.grad_expected = None  # the trainable W's gradient the model expects
        self.previous_weight = self.head.weight.detach().clone()

    # ------------------------------------------------------------------------ helpers
    def make(self, spec):
        dtype, dim = self.config["stats_dtype"], self.config["dim"]
        rng = np.random.default_rng(spec["seed"])
        x = rng.standard_normal((spec["rows"], dim)) @ rng.standard_normal((dim, dim))
        x = x * SCALES[dtype][spec["scale"]]
        if spec["poison"] and spec["rows"]:
            x[rng.integers(spec["rows"]), rng.integers(dim)] = float(spec["poison"])
        z = torch.from_numpy(x).to(dtype)
        return z, z.double().numpy()

    def run(self, fn):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # skips and refusals warn; counted instead
            return fn()

    def rejected(self, before):
        """Reconcile a refresh the head refused (an iterative result above its bound)."""
        if int(self.head.refresh_rejections) > before:
            assert self.config["refresh"] != "exact"
            self.model.W = self.previous_weight.double().numpy().copy()
            self.model.refreshed_at = int(self.head.refreshed_at)
            self.model.refreshed = False

    def check_output(self, out, x, w, slack=0.0):
        """``slack``: the relative error allowed in ``w`` (it was refreshed by the model in this call)."""
        expected = x @ w.T
        finite = np.isfinite(expected)
        size = np.abs(x[np.isfinite(x)]).max(initial=0) * np.abs(w).max() * x.shape[-1]
        wide = self.config["stats_dtype"] == torch.float64 and self.head.weight.dtype == torch.float64
        rounding = (1e-12 if wide else 1e-5) + slack  # a trainable W_p is float32
        np.testing.assert_allclose(out.detach().double().numpy()[finite], expected[finite], rtol=0,
                                   atol=size * rounding + 1e-300)

    def training_call(self, spec, wrap=None, autocast=False):
        z, x = self.make(spec)
        reachable = spec["requires_grad"] or self.config["trainable"]
        z = z.requires_grad_(spec["requires_grad"])
        rejections = int(self.head.refresh_rejections)
        self.model.refreshed = False
        def forward():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                return self.head(z) if wrap is None else wrap(z)

        out = self.run(forward)
        w = self.model.call(x, reachable)
        self.rejected(rejections)
        # a refresh at this call's start (a deferred one, or the last step's pool) is the model's own
        # W_p, equal to the head's within the refresh tolerance (checked by the invariant)
        slack = self.weight_tolerance() if self.model.refreshed_before_output else 0.0
        self.check_output(out, x, w, slack=math.inf if slack is None else slack)
        if out.requires_grad:
            self.pending.append((z, out, w, x, wrap is not None))

    # -------------------------------------------------------------------------- rules
    @rule(spec=batches)
    def train(self, spec):
        self.training_call(spec)

    @rule(spec=batches)
    def train_under_autocast(self, spec):
        """Inside the caller's bf16 autocast region: statistics, refreshes and output stay exact."""
        self.training_call(spec, autocast=True)

    @rule(spec=batches)
    def checkpointed(self, spec):
        """Non-reentrant checkpointing: the head is recomputed during the backward pass."""
        self.training_call(dict(spec, requires_grad=True),
                           wrap=lambda z: checkpoint(self.head, z, use_reentrant=False))

    @rule(spec=batches)
    def reentrant(self, spec):
        z, _ = self.make(spec)
        with pytest.raises(RuntimeError, match="reentrant checkpointing"):
            self.run(lambda: checkpoint(self.head, z.requires_grad_(True), use_reentrant=True))
        self.model.untracked += 1

    @precondition(lambda self: self.pending)
    @rule(kind=st.sampled_from(["full", "full", "inputs", "autograd.grad"]))
    def backward(self, kind):
        pending, self.pending = self.pending, []
        outs = [out for _, out, _, _, _ in pending]
        loss = sum((out.double() ** 2).mean() for out in outs)
        recomputes = any(wrapped for *_, wrapped in pending)
        rejections = int(self.head.refresh_rejections)
        if recomputes and not self.model.recomputable():
            with pytest.raises(RuntimeError, match="cannot be recomputed exactly"):
                self.run(lambda: loss.backward())
            self.model.backward_reached()  # the outputs' hooks run before the recomputation fails
            self.rejected(rejections)
            return
        targets = [z for z, *_ in pending if z.requires_grad][:1] or [self.head.weight]
        grads = {}
        if kind == "full":
            self.run(lambda: loss.backward())
        elif kind == "inputs":  # only one input: the backward misses the other calls' inputs
            self.run(lambda: loss.backward(inputs=targets))
        else:
            grads = dict(zip(map(id, targets), self.run(lambda: torch.autograd.grad(loss, targets))))
        self.model.backward_reached()
        self.rejected(rejections)
        for z, out, w, x, _ in pending:
            if not z.requires_grad:
                continue
            grad = z.grad if kind != "autograd.grad" else grads.get(id(z))
            if grad is None or (kind == "inputs" and z is not targets[0]):
                continue
            expected = 2 * (x @ w.T) / out.numel() @ w
            finite = np.isfinite(expected)
            size = max(np.abs(expected[finite]).max(initial=0), 1e-300)
            np.testing.assert_allclose(grad.double().numpy()[finite], expected[finite], rtol=0, atol=1e-4 * size)
        if self.config["trainable"] and (kind == "full" or (kind == "inputs" and targets[0] is self.head.weight)):
            expected = sum(2 * (x @ w.T).T @ x / out.numel() for z, out, w, x, _ in pending)
            self.grad_expected = expected if self.grad_expected is None else self.grad_expected + expected

    @precondition(lambda self: self.pending)
    @rule()
    def discard(self):
        """Outputs that no backward pass reaches (the step goes on)."""
        self.pending = []

    @precondition(lambda self: self.config["trainable"])
    @rule()
    def optimizer_step(self):
        grad = self.head.weight.grad
        if grad is None or self.grad_expected is None:
            return
        if not (np.isfinite(self.grad_expected).all() and np.abs(self.grad_expected).max() < 1e4):
            self.optimizer.zero_grad()  # a step that would blow W_p up teaches nothing about the head
            self.grad_expected = None
            return
        np.testing.assert_allclose(grad.double().numpy(), self.grad_expected, rtol=1e-4,
                                   atol=1e-4 * max(np.abs(self.grad_expected).max(), 1e-30))
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.model.attempts += 1  # W_p moved: a call after this one in the same step used another W_p
        self.model.W = self.model.W - LR * grad.double().numpy()
        self.grad_expected = None
        self.previous_weight = self.head.weight.detach().clone()

    @rule(spec=batches)
    def update(self, spec):
        z, x = self.make(spec)
        rejections = int(self.head.refresh_rejections)
        self.model.refreshed = False
        self.run(lambda: self.head.update(z))
        self.model.update(x)
        self.rejected(rejections)

    @rule(spec=batches, mode=st.sampled_from(["eval", "no_grad"]))
    def inference(self, spec, mode):
        z, x = self.make(spec)
        if mode == "eval":
            self.head.eval()
            out = self.head(z)
            self.head.train()
        else:
            with torch.no_grad():
                out = self.head(z)
            self.model.untracked += 1
        self.check_output(out, x, self.model.W)
        self.model.refreshed = False

    @precondition(lambda self: not self.pending)
    @rule(how=st.sampled_from(["save_load", "deepcopy", "dtype_round_trip"]))
    def persist(self, how):
        if how == "save_load":
            buffer = io.BytesIO()
            torch.save(self.head.state_dict(), buffer)
            buffer.seek(0)
            fresh = DirectPredHead(self.config["dim"], **self.options)
            fresh.load_state_dict(torch.load(buffer, weights_only=True))
            self.reattach(fresh)
            model = self.model  # a loaded head starts a new step record and keeps a boundary where it matters
            model.step_attempts, model.untracked = [], 0
            model.boundary = model.boundary and (model.deferred or (model.auto and bool(model.pool)))
        elif how == "deepcopy":
            self.reattach(copy.deepcopy(self.head))
            if self.config["trainable"] and self.model.step_attempts:
                # the copy's W_p is another parameter: which W_p the step's calls used is no longer sure
                self.model.step_attempts.append(None)
        elif not self.config["trainable"]:  # a trainable W_p would be rounded by the trip, as documented
            self.head.to(torch.float64).to(torch.float16).float()
        self.model.refreshed = False

    def reattach(self, head):
        grad = self.head.weight.grad if self.config["trainable"] else None
        self.head = head
        if self.config["trainable"]:
            self.optimizer = torch.optim.SGD(self.head.parameters(), lr=LR)
            self.head.weight.grad = None if grad is None else grad.clone()

    def weight_tolerance(self):
        """Relative Frobenius error allowed in a refreshed W_p, or None where rounding decides it.

        Rounding of the statistics (relative ``noise``) moves an eigenvalue that is 0 in exact
        arithmetic by ~noise, and a power alpha < 1 turns that into noise^alpha; an iterative
        refresh adds its certified 1%; a trainable W_p is rounded to float32.
        """
        config, model = self.config, self.model
        u = torch.finfo(config["stats_dtype"]).eps
        target = model.target()
        scale, largest = model.scale(), np.abs(target).max()
        noise = config["dim"] * u * scale / largest if largest > 0 else (0.0 if scale <= 1e-300 else math.inf)
        if noise > 1e-5:
            return None
        alpha = {"directpred": 0.5, "directcopy": 1.0, "directset": config["alpha"]}[config["variant"]]
        tolerance = 10 * config["dim"] * max(noise, config["dim"] * u) ** min(alpha, 1.0)
        if config["refresh"] != "exact" and alpha in (0.5, 1.0):
            tolerance += 1e-2
        return tolerance + 10 * torch.finfo(self.head.weight.dtype).eps

    # ------------------------------------------------------------------------ invariants
    @invariant()
    def agrees_with_the_model(self):
        if not hasattr(self, "head"):
            return
        head, model, config = self.head, self.model, self.config
        assert int(head.num_updates) == model.updates
        assert int(head.num_skipped) == model.skipped
        assert head.schedule.steps == model.steps and head.schedule.calls == len(model.pool)
        assert head.schedule.deferred == model.deferred
        target = model.target()
        dtype = config["stats_dtype"]
        u = torch.finfo(dtype).eps
        scale = model.scale()
        np.testing.assert_allclose(head.corr.double().numpy() / scale, target / scale, rtol=0,
                                   atol=50 * config["dim"] * u)
        weight = head.weight.detach().double().numpy().copy()  # not a view: the head refreshes in place
        if model.refreshed:
            tolerance = self.weight_tolerance()
            if tolerance is None:  # the rule reads rounding noise (collapsed centred batches): finite only
                assert np.isfinite(weight).all()
            else:
                reference = model.W
                norm = np.linalg.norm(reference)
                error = np.linalg.norm(weight - reference) / (norm if norm > 0 else 1.0)
                assert error <= tolerance, (error, tolerance)
            model.W = weight  # each refresh is checked on its own; later outputs use what the head holds
        else:
            np.testing.assert_allclose(weight, model.W, rtol=1e-6, atol=1e-6 * max(np.abs(model.W).max(), 1))
        model.refreshed = False
        self.previous_weight = head.weight.detach().clone()


HeadMachine.TestCase.settings = PROFILE
test_head_follows_its_contract = HeadMachine.TestCase
