"""Model-based test: random call sequences drive a head and a plain model of its documented contract.

A Hypothesis ``RuleBasedStateMachine`` draws a configuration (variant, refresh, freq,
calls_per_update, center, stats_dtype, trainable) and then any sequence of: training-mode
calls (inputs with or without grad, NaN/inf, empty, huge and tiny batches), backward passes
(full, ``inputs=``, ``torch.autograd.grad``), outputs discarded unreached, ``update(z)``,
eval and no-grad calls, non-reentrant and reentrant checkpointed calls, optimizer steps (of
the optimizer of a trainable ``W_p``, or of another one), save and load into a fresh head,
deepcopy and dtype round trips (outputs of the head before the trip still pending).
:class:`ContractModel` restates the contract in NumPy float64 (steps, pools, folds, when a
step ends, refresh timing); the machine restates which calls a recomputation may serve.
After every rule the head must agree with them: ``F_hat``, ``W_p`` (within the tolerance of
its refresh strategy), the counters, the outputs, the gradients, or the documented error.

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

settings.register_profile("ci", max_examples=300, stateful_step_count=30, deadline=None,
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


class Weight:
    """One ``W_p`` the head holds between two writes of it.

    ``exact`` is filled in from the head once the model's own value has been checked against it
    (a refresh is equal only within its strategy's tolerance): whether the pending calls of a
    recomputation used the same ``W_p`` is a question about values, so it is answered with the
    head's exact ones.
    """

    __slots__ = ("exact",)

    def __init__(self, exact=None):
        self.exact = exact


class ContractModel:
    """The head's documented behaviour, restated plainly (NumPy float64, no shortcuts).

    Steps (docs/head.md, "The update pipeline"). An integer ``calls_per_update`` closes the pool
    after that many calls (``update`` counts as one). With ``"auto"``: a call no backward pass can
    reach (input without grad, ``W_p`` not trainable) and ``update(z)`` are steps of their own,
    folded at once beside the open pool. Otherwise the call joins the pool, and what ends the step
    depends on what the head watches, read at the pool's first call (and at the first call after a
    load or a copy): the parameters its input was computed from (none here: the inputs are leaf
    tensors) and a trainable ``W_p``. Watching nothing, a backward pass that reaches an output ends
    the step (the pool folds, and refreshes when due, in that backward pass). Watching ``W_p``,
    backward passes end nothing: the step ends at the next step of the optimizer that holds
    ``W_p`` (after it moved ``W_p``, whatever it updated; another optimizer's step ends nothing),
    or else at the next training call if ``W_p`` was written in place since the pool read what it
    watches (an update made without that optimizer: here a refresh of a step of its own, used or
    kept; the head decides a refresh on the device, so a kept one counts as a write too). A load
    keeps the open pool.

    A step that closes folds its pool (``C``: the pooled correlation; skipped if it is not
    representable, unchanged if it has no rows) and every ``freq``-th step refreshes ``W_p``
    from ``F_hat`` if it changed since the last refresh.
    """

    def __init__(self, config):
        self.c = config
        self.auto = config["calls_per_update"] == "auto"
        self.watches_weight = config["trainable"]  # the only parameter the model's calls depend on
        dim = config["dim"]
        self.F, self.mu, self.W = np.zeros((dim, dim)), np.zeros(dim), np.eye(dim)
        self.weight = Weight()  # what the calls use now
        self.updates = self.skipped = self.steps = self.refreshed_at = self.rejections = 0
        self.pool = []
        self.watching = False  # the open pool has read what it watches
        self.written = False  # W_p was written in place since then
        self.refreshed = False  # did the last operation refresh W
        self.refreshed_before_output = False  # did the last call's start refresh W (its output uses that)
        self.before_refresh = None  # (W, weight, refreshed_at) before the last refresh, for a refused one

    # ------------------------------------------------------------------ the contract
    def waits_for_optimizer_step(self):
        return self.auto and self.watches_weight and bool(self.pool) and self.watching

    def call(self, x, reachable):
        """A training-mode call; returns ``(W, Weight)`` its output uses."""
        self.refreshed_before_output = False
        if self.waits_for_optimizer_step() and self.written:
            self.close()  # the step's update came without an optimizer step the head was told of
            self.refreshed_before_output = self.refreshed
        used = (self.W.copy(), self.weight)
        if self.auto and not reachable:
            self.fold([x])  # a step of its own, beside the open pool
            self.end_step()
            return used
        if self.auto and not self.watching:
            self.watching, self.written = True, False
        self.pool.append(x)
        if not self.auto and len(self.pool) == self.c["calls_per_update"]:
            self.close()
        return used

    def update(self, x):
        if self.auto:
            self.fold([x])
            self.end_step()
            return
        self.pool.append(x)
        if len(self.pool) == self.c["calls_per_update"]:
            self.close()

    def backward_reached(self):
        """A backward pass reached an output of this head."""
        if self.auto and self.pool and not self.watches_weight:
            self.close()

    def optimizer_step(self, holds_weight, grad):
        """A torch.optim step; ``grad``: what it subtracted (times LR) from W_p, None if it left W_p alone."""
        if grad is not None:
            self.set_weight(self.W - LR * grad)
            self.wrote_weight()
        if holds_weight and self.waits_for_optimizer_step():
            self.close()

    def loaded(self):
        """This state was saved and loaded into another head (or deep-copied)."""
        self.watching = self.written = False

    def close(self):
        parts, self.pool = self.pool, []
        self.watching = self.written = False
        self.fold(parts)
        self.end_step()

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
        underflow = any(0 < m < math.sqrt(info.tiny) for m in largest)
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

    def end_step(self):
        self.steps += 1
        if self.steps % self.c["freq"] == 0:
            self.refresh()

    def refresh(self):
        self.before_refresh = (self.W, self.weight, self.refreshed_at)
        self.wrote_weight()
        if self.updates > self.refreshed_at:
            self.set_weight(self.rule(self.target()))
            self.refreshed_at = self.updates
            self.refreshed = True

    def refused(self, rejections, refreshed_at):
        """The head refused the refresh just made (an iterative result above its bound)."""
        self.W, self.weight, _ = self.before_refresh
        self.refreshed_at, self.rejections, self.refreshed = refreshed_at, rejections, False

    def set_weight(self, w):
        self.W, self.weight = w, Weight()

    def wrote_weight(self):
        if self.watching:
            self.written = True

    def target(self):
        """The matrix the rule reads: F_hat, or with center the covariance (kept in ``F``)."""
        return self.F

    def scale(self):
        """The magnitude rounding of the head's statistics is relative to."""
        scale = np.abs(self.F).max()
        if self.c["center"]:  # the covariance is formed next to mu: its rounding scales with mu too
            with np.errstate(over="ignore"):
                scale = max(scale, np.abs(self.mu).max() ** 2)
        return max(scale, np.finfo(np.float64).tiny)

    def rule(self, m):
        if self.c["variant"] == "directset":
            return directset_matrix(m, self.c["eps"], self.c["alpha"])
        return RULES[self.c["variant"]](m, self.c["eps"])


class Output:
    """A training call's output (alive), what it was computed from, and whether its node ran in a backward pass."""

    __slots__ = ("z", "out", "x", "w", "weight", "checkpointed", "head", "param", "ran")

    def __init__(self, z, out, x, w, weight, checkpointed, head, param):
        self.z, self.out, self.x, self.w, self.weight = z, out, x, w, weight
        self.checkpointed, self.head, self.param = checkpointed, head, param
        self.ran = False


def same_values(outputs):
    first = outputs[0].weight.exact
    return all(np.array_equal(o.weight.exact, first) for o in outputs[1:])


class HeadMachine(RuleBasedStateMachine):
    @initialize(config=configurations)
    def build(self, config):
        if config["variant"] != "directset":
            config["alpha"] = 0.5
        options = lambda: {k: v for k, v in config.items() if k not in ("dim", "alpha")}  # noqa: E731
        if config["refresh"] == "iterative" and config["variant"] == "directset" and config["alpha"] not in (0.5, 1.0):
            with pytest.raises(ValueError, match="no iterative form"):
                DirectPredHead(config["dim"], alpha=config["alpha"], **options())
            config["refresh"] = "exact"
        if config["trainable"] and config["freq"] == 1:
            with pytest.raises(ValueError, match="freq > 1"):
                DirectPredHead(config["dim"], **dict(options(), calls_per_update="auto"))
            config["freq"] = 2
        if config["trainable"] and config["calls_per_update"] != "auto":
            with pytest.raises(ValueError, match="trainable=True needs calls_per_update='auto'"):
                DirectPredHead(config["dim"], **options())
            config["calls_per_update"] = "auto"
        self.config = config
        self.options = options()
        if config["variant"] == "directset":
            self.options["alpha"] = config["alpha"]
        self.head = DirectPredHead(config["dim"], **self.options)
        self.model = ContractModel(config)
        self.optimizer = torch.optim.SGD(self.head.parameters(), lr=LR) if config["trainable"] else None
        self.other = torch.nn.Parameter(torch.zeros(2))  # another optimizer's: its steps end no step of the head
        self.other_optimizer = torch.optim.SGD([self.other], lr=LR)
        self.pending = []  # Outputs no backward pass has consumed, in the order of their calls
        self.kept = []  # Outputs kept alive after the backward pass that consumed them (their graph freed)
        self.grad_expected = self.grad_bound = None  # the trainable W's .grad the model expects, and
        # the sum of its terms' magnitudes (what the float32 sums of autograd may overflow at)

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
        """Reconcile a refresh the head refused (an iterative result above its bound); True if it did."""
        rejections = int(self.head.refresh_rejections)
        if rejections == before:
            return False
        assert rejections == before + 1 and self.config["refresh"] != "exact"
        assert self.model.refreshed, "a refusal counted where the model refreshed nothing"
        self.model.refused(rejections, int(self.head.refreshed_at))
        return True

    def check_output(self, out, x, w, slack=0.0):
        """``slack``: the relative error allowed in ``w`` (it was refreshed by the model in this call)."""
        with np.errstate(all="ignore"):  # NaN/inf inputs: compared where the result is finite
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
        head, model = self.head, self.model
        rejections = int(head.refresh_rejections)
        model.refreshed = False

        def forward():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                return head(z) if wrap is None else wrap(head, z)

        out = self.run(forward)
        w, weight = model.call(x, reachable)
        if self.rejected(rejections) and model.refreshed_before_output:
            w, weight = model.W.copy(), model.weight  # the refused refresh left the W_p the call used
            model.refreshed_before_output = False
        # a refresh at this call's start is the model's own W_p, equal to the head's within the
        # refresh tolerance (checked by the invariant; where rounding decides it, only its finiteness)
        slack = self.weight_tolerance() if model.refreshed_before_output else 0.0
        if slack is not None:
            self.check_output(out, x, w, slack=slack)
        assert out.requires_grad == reachable
        if out.requires_grad:
            param = head.weight if self.config["trainable"] else None
            self.pending.append(Output(z, out, x, w, weight, wrap is not None, head, param))

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
                           wrap=lambda head, z: checkpoint(head, z, use_reentrant=False))

    @rule(spec=batches)
    def reentrant(self, spec):
        """Refused before anything is pooled (its forward runs under no_grad)."""
        z, _ = self.make(spec)
        with pytest.raises(RuntimeError, match="reentrant checkpointing"):
            self.run(lambda: checkpoint(self.head, z.requires_grad_(True), use_reentrant=True))

    @precondition(lambda self: self.pending)
    @rule(kind=st.sampled_from(["full", "full", "inputs", "autograd.grad"]), keep=st.booleans())
    def backward(self, kind, keep):
        """A backward pass over every output not consumed yet: all of the graph, or one input's part of it.

        Autograd runs the outputs' nodes in reverse order of their calls. Each node that runs
        tells its head; a checkpointed call's node first recomputes the call, which uses the
        ``W_p`` of its head's pending calls (outputs alive whose nodes have not run, this pass's
        and any kept from before) if they all used the same values, and raises otherwise (the
        backward pass stops there). ``keep``: the outputs stay alive afterwards (as a caller
        that keeps its predictions does), the nodes that did not run still pending.
        """
        pending, self.pending = self.pending, []
        alive = self.kept + pending
        head, trainable = self.head, self.config["trainable"]
        loss = sum((p.out.double() ** 2).mean() for p in pending)
        with_grad = [p for p in pending if p.z.requires_grad]
        target = with_grad[0].z if with_grad else pending[0].param  # one input: a z, else a trainable W_p
        if kind == "full":
            reached = pending
        elif with_grad:
            reached = with_grad[:1]
        else:
            reached = [p for p in pending if p.param is target]
        ran, failed = [], None
        for p in reversed(reached):
            if p.checkpointed and not same_values([o for o in alive if o.head is p.head and not o.ran]):
                failed = p
                break
            ran.append(p)
            p.ran = True
        rejections = int(head.refresh_rejections)
        model = self.model
        model.refreshed = False
        grads = {}
        if kind == "full":
            go = lambda: loss.backward()  # noqa: E731
        elif kind == "inputs":
            go = lambda: loss.backward(inputs=[target])  # noqa: E731
        else:
            go = lambda: grads.update(zip([id(target)], torch.autograd.grad(loss, [target])))  # noqa: E731
        if failed is not None:
            with pytest.raises(RuntimeError, match="cannot be recomputed exactly"):
                self.run(go)
        else:
            self.run(go)
        if keep:
            self.kept += pending
        if any(p.head is head for p in ran):
            model.backward_reached()
        self.rejected(rejections)
        for p in pending:
            if not p.z.requires_grad:
                continue
            grad = grads.get(id(p.z)) if kind == "autograd.grad" else p.z.grad
            if p not in ran or (kind != "full" and p.z is not target):
                assert grad is None
                continue
            w = p.weight.exact
            with np.errstate(all="ignore"):
                expected = 2 * (p.x @ w.T) / max(p.out.numel(), 1) @ w
            finite = np.isfinite(expected)
            size = max(np.abs(expected[finite]).max(initial=0), 1e-300)
            np.testing.assert_allclose(grad.double().numpy()[finite], expected[finite], rtol=0, atol=1e-4 * size)
        mine = [p for p in pending if p.head is head] if trainable else []
        if mine and (kind == "full" or target is head.weight) and all(p in ran for p in mine):
            with np.errstate(all="ignore"):  # an empty output's mean is NaN, its gradient exactly zero
                expected = sum(2 * (p.x @ p.weight.exact.T).T @ p.x / max(p.out.numel(), 1) for p in mine)
                bound = sum(2 * np.abs(p.x @ p.weight.exact.T).T @ np.abs(p.x) / max(p.out.numel(), 1) for p in mine)
            if kind == "autograd.grad":
                if self.representable(bound):
                    self.check_weight_grad(grads[id(target)], expected)
            elif self.grad_expected is None:
                self.grad_expected, self.grad_bound = expected, bound
            else:
                with np.errstate(all="ignore"):
                    self.grad_expected, self.grad_bound = self.grad_expected + expected, self.grad_bound + bound

    def representable(self, bound):
        """Whether W_p's gradient is computed without overflow in its dtype (else it is not compared)."""
        return bool(np.isfinite(bound).all() and bound.max() < 1e-3 * torch.finfo(self.head.weight.dtype).max)

    def check_weight_grad(self, grad, expected):
        np.testing.assert_allclose(grad.double().numpy(), expected, rtol=1e-4,
                                   atol=1e-4 * max(np.abs(expected).max(), 1e-30))

    @precondition(lambda self: self.pending or self.kept)
    @rule(oldest_only=st.booleans())
    def discard(self, oldest_only):
        """Outputs dropped (the step goes on): their graphs are freed, their calls pending no more."""
        if oldest_only:
            self.pending = self.pending[1:]
        else:
            self.pending, self.kept = [], []

    @rule(own=st.booleans())
    def optimizer_step(self, own):
        """A step of the optimizer of the trainable W_p, or of another optimizer (own=False, or no trainable W_p)."""
        own = own and self.config["trainable"]
        weight = self.head.weight
        grad = weight.grad if own else None
        if own and (grad is not None) != (self.grad_expected is not None):
            raise AssertionError(f"W_p.grad is {'set' if grad is not None else 'None'}, "
                                 f"expected {'set' if self.grad_expected is not None else 'None'}")
        if grad is not None:
            if not (self.representable(self.grad_bound) and np.abs(self.grad_expected).max() < 1e4):
                weight.grad = grad = None  # a step that would blow W_p up teaches nothing about the head
            else:
                self.check_weight_grad(grad, self.grad_expected)
                grad = grad.double().numpy().copy()
            self.grad_expected = self.grad_bound = None
        rejections = int(self.head.refresh_rejections)
        self.model.refreshed = False
        self.run((self.optimizer if own else self.other_optimizer).step)
        self.model.optimizer_step(own, grad)
        self.rejected(rejections)
        if own:
            self.optimizer.zero_grad()

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
        """Outputs with the current W_p; nothing pooled, nothing pending (a no_grad training call included)."""
        z, x = self.make(spec)
        if mode == "eval":
            self.head.eval()
            out = self.head(z)
            self.head.train()
        else:
            with torch.no_grad():
                out = self.head(z)
        self.check_output(out, x, self.model.W)
        self.model.refreshed = False

    @rule(how=st.sampled_from(["save_load", "deepcopy", "dtype_round_trip"]))
    def persist(self, how):
        """The state goes on in another head; outputs of the old one stay pending on the old one."""
        if how == "save_load":
            buffer = io.BytesIO()
            torch.save(self.head.state_dict(), buffer)
            buffer.seek(0)
            fresh = DirectPredHead(self.config["dim"], **self.options)
            fresh.load_state_dict(torch.load(buffer, weights_only=True))
            self.reattach(fresh)
        elif how == "deepcopy":
            self.reattach(copy.deepcopy(self.head))
        elif not self.config["trainable"]:  # a trainable W_p would be rounded by the trip, as documented
            self.head.to(torch.float64).to(torch.float16).float()  # the statistics and a buffer W_p keep theirs
        self.model.refreshed = False

    def reattach(self, head):
        grad = self.head.weight.grad if self.config["trainable"] else None
        self.head = head
        self.model.loaded()
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
        assert int(head.refreshed_at) == model.refreshed_at
        assert int(head.refresh_rejections) == model.rejections
        assert head.steps.steps == model.steps and head.steps.calls == len(model.pool)
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
        else:
            np.testing.assert_allclose(weight, model.W, rtol=1e-6, atol=1e-6 * max(np.abs(model.W).max(), 1))
        if model.weight.exact is not None:  # not written since it was checked: the same values, bit for bit
            assert np.array_equal(weight, model.weight.exact)
        # each write of W_p is checked on its own; later outputs and recomputations use what the head holds
        model.W = weight
        model.weight.exact = weight
        model.refreshed = False


HeadMachine.TestCase.settings = PROFILE
test_head_follows_its_contract = HeadMachine.TestCase
