"""The head: what a training step does with it, called as lightly and solo-learn call it.

The reference recurrence (``_reference.py``, NumPy float64), steps under ``calls_per_update``
(integer and ``"auto"``, however the backward pass is run), the trainable hybrid, eval and
no-grad calls, AMP and dtype casts, torch.compile, activation checkpointing and the
diagnostics. State across saves and loads is in ``test_state_dict.py``; random sequences of
all of these against a reference model are in ``test_model.py``.
"""

import contextlib
import copy
import pickle
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from _helpers import DIM, TinySimSiam, assert_same_state, call, make_batches, sgd_step, snapshot, views
from _lightly_models import TwoViews, byol_class, quiet_trainer_options
from _reference import ReferenceHead, directpred_matrix
from directpred_plugin import DirectPredHead

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]


def batches64(n=12, **kwargs):
    return make_batches(n, dtype=torch.float64, **kwargs)


def train_calls(head, batches):
    """Training-mode calls with autograd on, as in a real training step.

    No backward pass follows them: under ``calls_per_update="auto"`` (the default) they would
    pool into one open step, so the tests of the recurrence per update build their heads with
    ``calls_per_update=1``.
    """
    head.train()
    return [call(head, z).detach() for z in batches]


@pytest.mark.parametrize("variant", ["directpred", "directcopy"])
@pytest.mark.parametrize("freq", [1, 3])
@pytest.mark.parametrize("center", [False, True])
def test_matches_reference_recurrence(variant, freq, center):
    batches = batches64()
    head = DirectPredHead(DIM, rho=0.3, eps=0.05, freq=freq, variant=variant, center=center, stats_dtype=torch.float64,
                          calls_per_update=1)
    ref = ReferenceHead(DIM, rho=0.3, eps=0.05, freq=freq, variant=variant, center=center)
    for z in batches:
        expected = ref.output(z.numpy())
        got = head(z.clone().requires_grad_(True))
        ref.fold(z.numpy())
        np.testing.assert_allclose(got.detach().numpy(), expected, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(head.weight.numpy(), ref.W, rtol=1e-9, atol=1e-9)
        expected_corr = ref.F - np.outer(ref.mu, ref.mu) if center else ref.F  # center keeps the covariance
        np.testing.assert_allclose(head.corr.numpy(), expected_corr, rtol=1e-11, atol=1e-11)
    assert int(head.num_updates) == len(batches)


def test_float32_statistics_track_reference():
    batches = [b.float() for b in batches64()]
    head = DirectPredHead(DIM, calls_per_update=1)
    ref = ReferenceHead(DIM)
    outs = train_calls(head, batches)
    expected = ref.run([b.double().numpy() for b in batches])
    for got, exp in zip(outs, expected):
        np.testing.assert_allclose(got.numpy(), exp, rtol=1e-4, atol=1e-4)
    assert head.corr.dtype == torch.float32 and head.weight.dtype == torch.float32


def test_first_call_uses_identity_and_current_batch_only_afterwards():
    z0, z1 = batches64(2)
    head = DirectPredHead(DIM, stats_dtype=torch.float64, calls_per_update=1)
    out0 = head(z0.clone().requires_grad_(True))
    assert torch.equal(out0.detach(), z0)  # identity before any statistics
    np.testing.assert_allclose(head.corr.numpy(), (z0.T @ z0 / len(z0)).numpy(), rtol=1e-12)
    np.testing.assert_allclose(head.weight.numpy(), directpred_matrix(head.corr.numpy(), 0.01), atol=1e-10)
    out1 = head(z1.clone().requires_grad_(True))
    np.testing.assert_allclose(out1.detach().numpy(), z1.numpy() @ directpred_matrix((z0.T @ z0 / 32).numpy(), 0.01).T, atol=1e-9)


def test_freq_keeps_identity_until_the_freq_th_update():
    head = DirectPredHead(DIM, freq=4, stats_dtype=torch.float64, calls_per_update=1)
    for k, z in enumerate(batches64(4), start=1):
        head(z.clone().requires_grad_(True))
        if k < 4:
            assert torch.equal(head.weight, torch.eye(DIM, dtype=torch.float64))
    assert not torch.equal(head.weight, torch.eye(DIM, dtype=torch.float64))


def test_eval_mode_and_no_grad_change_nothing():
    head = DirectPredHead(DIM, calls_per_update=1)
    train_calls(head, make_batches(3))
    before = snapshot(head)
    z = make_batches(1, seed=5)[0]
    head.eval()
    out_eval = head(z)
    head.train()
    with torch.no_grad():
        out_nograd = head(z)
    with torch.inference_mode():
        head(z)
    assert_same_state(before, snapshot(head))
    assert torch.allclose(out_eval, z @ head.weight.T)
    assert torch.equal(out_eval, out_nograd)


def test_gradient_flows_to_input_with_current_weight():
    head = DirectPredHead(DIM, calls_per_update=1)
    train_calls(head, make_batches(3))
    w_before = head.weight.clone()
    z = make_batches(1, seed=9)[0].requires_grad_(True)
    out = head(z)
    assert not torch.equal(head.weight, w_before)  # refreshed during the call
    grad = torch.randn_like(out)
    out.backward(grad)
    torch.testing.assert_close(z.grad, grad @ w_before)


def test_trainable_hybrid_trains_between_refreshes_and_each_refresh_follows_the_optimizer_step():
    """The optimizer moves W_p by the gradient taken at the W_p the step used; a due refresh
    overwrites it right after that optimizer step, never between a step's forward and its optimizer step."""
    head = DirectPredHead(DIM, freq=2, trainable=True)
    assert head.calls_per_update == "auto"
    assert isinstance(head.weight, torch.nn.Parameter)
    assert [name for name, _ in head.named_parameters()] == ["weight"]
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    after_step, refreshes = head.weight.detach().clone(), 0
    for step, z in enumerate(make_batches(10), start=1):
        a, b = z[:16].clone().requires_grad_(True), z[16:].clone().requires_grad_(True)
        out_a = head(a)
        used = head.weight.detach().clone()
        assert torch.equal(used, after_step)  # nothing moved W_p between the optimizer step and this step
        out_b = head(b)
        assert torch.equal(head.weight.detach(), used)  # and nothing moves W_p within the step
        loss = (out_a - 1).pow(2).mean() + (out_b + 1).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        assert torch.equal(head.weight.detach(), used) and int(head.num_updates) == step - 1  # not before opt.step()
        w = used.clone().requires_grad_(True)  # the gradient of this loss at the W_p its outputs used
        ((a.detach() @ w.T - 1).pow(2).mean() + (b.detach() @ w.T + 1).pow(2).mean()).backward()
        torch.testing.assert_close(head.weight.grad, w.grad)
        torch.testing.assert_close(out_a.detach(), a.detach() @ used.T)
        torch.testing.assert_close(out_b.detach(), b.detach() @ used.T)
        opt.step()
        assert int(head.num_updates) == step  # the optimizer step ended the step: its two calls, one update
        if step % 2 == 0:  # refreshed right after the optimizer step: the rule on F_hat, top eigenvalue 1 + eps
            refreshes += 1
            assert int(head.refreshed_at) == step
            np.testing.assert_allclose(head.weight.detach().double().numpy(),
                                       directpred_matrix(head.corr.double().numpy(), head.eps), atol=1e-5)
            top = torch.linalg.eigvalsh((head.weight.detach() + head.weight.detach().T) / 2).max()
            assert float(top) == pytest.approx(1 + head.eps, rel=1e-4)
        else:  # trained: moved by the gradient taken at the W_p the step used
            torch.testing.assert_close(head.weight.detach(), used - 0.1 * w.grad)
        after_step = head.weight.detach().clone()
    assert refreshes == 5


@pytest.mark.parametrize("layout", ["two models", "backbone and W_p optimizers"])
def test_trainable_weight_is_refreshed_after_its_own_optimizer_step_with_several_optimizers(layout):
    """Several optimizers stepped one after the other after the backward pass (two models, or a
    W_p with its own optimizer): a due refresh follows the optimizer step that used W_p's
    gradient, so W_p after a refresh step is the rule on F_hat, not the rule plus a gradient step."""
    torch.manual_seed(0)
    if layout == "two models":
        heads = [DirectPredHead(DIM, trainable=True, freq=2) for _ in range(2)]
        optimizers = [torch.optim.SGD(h.parameters(), lr=0.1) for h in heads]

        def forward_backward():
            for h in heads:
                h(torch.randn(32, DIM, requires_grad=True)).pow(2).mean().backward()
    else:
        # wider than DIM: a rank-deficient F_hat would put float32 rounding under the square root
        projector, head = nn.Linear(12, DIM), DirectPredHead(DIM, trainable=True, freq=2)
        heads = [head]
        optimizers = [torch.optim.SGD(projector.parameters(), lr=0.1), torch.optim.SGD(head.parameters(), lr=0.1)]

        def forward_backward():
            head(projector(torch.randn(32, 12))).pow(2).mean().backward()

    for step in range(1, 5):
        forward_backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad()
        for h in heads:
            assert int(h.num_updates) == step
            if step % 2 == 0:
                assert int(h.refreshed_at) == step
                np.testing.assert_allclose(h.weight.detach().double().numpy(),
                                           directpred_matrix(h.corr.double().numpy(), h.eps), atol=1e-5)


@pytest.mark.parametrize("calls_per_update", [1, 2])
def test_trainable_hybrid_refuses_an_integer_calls_per_update(calls_per_update):
    """A pool closed after n calls would refresh a trainable W_p inside a step, before its optimizer step."""
    with pytest.raises(ValueError, match="trainable=True needs calls_per_update='auto'"):
        DirectPredHead(DIM, freq=2, trainable=True, calls_per_update=calls_per_update)


def test_calls_per_update_pools_views_like_the_paper():
    batches = batches64(8)
    head = DirectPredHead(DIM, calls_per_update=2, freq=2, stats_dtype=torch.float64)
    ref = ReferenceHead(DIM, freq=2)
    for view1, view2 in zip(batches[0::2], batches[1::2]):
        expected1, expected2 = ref.output(view1.numpy()), ref.output(view2.numpy())
        got1 = head(view1.clone().requires_grad_(True))
        got2 = head(view2.clone().requires_grad_(True))
        ref.fold(torch.cat([view1, view2]).numpy())  # one update per iteration, views pooled
        np.testing.assert_allclose(got1.detach().numpy(), expected1, atol=1e-9)
        np.testing.assert_allclose(got2.detach().numpy(), expected2, atol=1e-9)
        np.testing.assert_allclose(head.weight.numpy(), ref.W, atol=1e-9)
    assert int(head.num_updates) == 4


def test_batch_size_one_and_zero_batch():
    head = DirectPredHead(DIM, stats_dtype=torch.float64, calls_per_update=1)
    ref = ReferenceHead(DIM)
    singles = [z[:1] for z in batches64(5)]
    for z in singles:
        head(z.clone().requires_grad_(True))
        ref.fold(z.numpy())
    np.testing.assert_allclose(head.weight.numpy(), ref.W, atol=1e-9)
    zeros = DirectPredHead(DIM, eps=0.1, calls_per_update=1)
    zeros(torch.zeros(4, DIM, requires_grad=True))
    assert torch.allclose(zeros.weight, 0.1 * torch.eye(DIM))


@pytest.mark.parametrize(
    "shape", [(DIM,), (4, DIM + 1), (2, 4, DIM), (4, 1)]
)
def test_wrong_shape_raises_value_error_naming_expected_shape(shape):
    head = DirectPredHead(DIM)
    with pytest.raises(ValueError, match=rf"\(batch, {DIM}\)"):
        head(torch.randn(*shape))


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
def test_autocast_keeps_statistics_in_float32(monkeypatch, amp_dtype):
    seen = []
    real_eigh = torch.linalg.eigh

    def spy(matrix, *args, **kwargs):
        seen.append(matrix.dtype)
        return real_eigh(matrix, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", spy)
    torch.manual_seed(0)
    layer = torch.nn.Linear(DIM, DIM)
    head = DirectPredHead(DIM)
    opt = torch.optim.SGD(layer.parameters(), lr=0.01)  # each optimizer step ends a step of the head
    ref = ReferenceHead(DIM)
    xs = [b.float() for b in batches64(4)]
    for x in xs:
        with torch.autocast("cpu", dtype=amp_dtype):
            z = layer(x)
            assert z.dtype == amp_dtype
            out = head(z)
        assert out.dtype == amp_dtype
        opt.zero_grad()
        out.float().sum().backward()
        opt.step()
        ref.fold(z.detach().double().numpy())
    assert int(head.num_updates) == len(xs)
    assert head.corr.dtype == torch.float32
    assert seen and set(seen) == {torch.float32}
    np.testing.assert_allclose(head.weight.numpy(), ref.W, atol=1e-4)
    with torch.autocast("cpu", dtype=amp_dtype):
        assert head(xs[0]).dtype == torch.float32  # fp32 input stays fp32


def test_a_refresh_after_an_optimizer_step_is_exact_under_autocast():
    """A trainable head's refresh runs right after the optimizer step, in float32 even when the
    caller steps the optimizer inside its autocast region."""
    head = DirectPredHead(DIM, trainable=True, freq=2)
    opt = torch.optim.SGD(head.parameters(), lr=0.0)  # W_p moves only by refreshes
    refreshed = 0
    for z in make_batches(6):
        before = head.weight.detach().clone()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = head(z.clone().requires_grad_(True))
            opt.zero_grad()
            out.float().pow(2).mean().backward()
            opt.step()  # ends the step: fold, and the refresh when due, still inside the autocast region
        if not torch.equal(head.weight.detach(), before):
            refreshed += 1
            # the rule on the statistics the refresh read: all steps so far
            exact = directpred_matrix(head.corr.double().numpy(), head.eps)
            top = torch.linalg.eigvalsh(head.weight.detach().double()).max()
            assert float(top) == pytest.approx(1 + head.eps, abs=1e-5)  # bf16 products would miss by ~1e-3
            np.testing.assert_allclose(head.weight.detach().numpy(), exact, atol=1e-5)
    assert refreshed == 3


def test_half_and_dtype_casts_keep_statistics_in_stats_dtype():
    head = DirectPredHead(DIM, calls_per_update=1)
    train_calls(head, make_batches(3))
    corr = head.corr.clone()
    head.half()
    assert head.corr.dtype == torch.float32 and torch.equal(head.corr, corr)
    out = head(torch.randn(5, DIM, dtype=torch.float16, requires_grad=True))
    assert out.dtype == torch.float16
    head.to(torch.float64)
    assert head.corr.dtype == torch.float32
    trainable = DirectPredHead(DIM, trainable=True, freq=2).double()
    assert trainable.weight.dtype == torch.float64 and trainable.corr.dtype == torch.float32


def _failing_eigh(real, fail_dtypes, mode):
    def eigh(matrix, *args, **kwargs):
        if matrix.dtype in fail_dtypes:
            if mode == "raise":
                raise torch.linalg.LinAlgError("simulated convergence failure")
            values, vectors = real(matrix, *args, **kwargs)
            return values * float("nan"), vectors
        return real(matrix, *args, **kwargs)

    return eigh


@pytest.mark.parametrize("mode", ["raise", "nan"])
def test_eigh_failure_retries_in_float64(monkeypatch, mode):
    monkeypatch.setattr(torch.linalg, "eigh", _failing_eigh(torch.linalg.eigh, {torch.float32}, mode))
    batches = make_batches(3)
    head = DirectPredHead(DIM, calls_per_update=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_calls(head, batches)
    ref = ReferenceHead(DIM)
    ref.run([b.double().numpy() for b in batches])
    np.testing.assert_allclose(head.weight.numpy(), ref.W, atol=1e-5)


def test_eigh_failure_in_every_dtype_keeps_previous_weight(monkeypatch):
    batches = [b.float() for b in batches64(4)]
    head = DirectPredHead(DIM, calls_per_update=1)
    train_calls(head, batches[:2])
    weight = head.weight.clone()
    monkeypatch.setattr(
        torch.linalg, "eigh", _failing_eigh(torch.linalg.eigh, {torch.float32, torch.float64}, "raise")
    )
    with pytest.warns(RuntimeWarning, match="keeping the previous W_p") as record:
        train_calls(head, batches[2:])  # learned at the second of them
    assert len(record) == 1
    assert torch.equal(head.weight, weight)
    assert int(head.num_updates) == 4  # statistics still advance
    monkeypatch.undo()
    assert head.diagnostics()["refresh_rejections"] == 2


def test_diagnostics_report_alignment_collapse_and_spectra():
    head = DirectPredHead(DIM, calls_per_update=1)
    assert np.isnan(head.alignment()) and np.isnan(head.diagnostics()["rankme"])
    train_calls(head, [b.float() for b in batches64(4)])
    diag = head.diagnostics()
    assert "last_collapse" not in diag
    assert diag["alignment"] == pytest.approx(1.0, abs=1e-6)
    assert diag["num_updates"] == 4 and diag["num_steps"] == 4
    # RankMe: the effective rank of the singular values, sqrt of F_hat's eigenvalues
    singular = head.spectra()["corr"].clamp_min(0).sqrt()
    p = singular / singular.sum()
    assert diag["rankme"] == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-6)
    assert 1.0 < diag["rankme"] <= DIM
    spectra = head.spectra()
    assert spectra["corr"][0] == pytest.approx(diag["corr_eig_max"])
    assert diag["weight_eig_max"] == pytest.approx(1.0 + head.eps, rel=1e-5)
    assert torch.all(spectra["corr"][:-1] >= spectra["corr"][1:])
    assert 1.0 <= diag["corr_effective_rank"] <= DIM
    with torch.no_grad():
        head.weight.copy_(torch.randn(DIM, DIM))
    assert head.alignment() < 0.9
    collapsed = DirectPredHead(DIM, calls_per_update=1)
    collapsed(torch.ones(16, DIM, requires_grad=True))
    assert collapsed.diagnostics()["rankme"] == pytest.approx(1.0, abs=1e-3)  # projections on a line


# ------------------------------------------------------------------------------ torch.compile
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "device, trainable, refresh, backend",
    [
        ("cpu", False, "exact", "aot_eager"),
        ("cpu", False, "iterative", "aot_eager"),
        ("cpu", True, "exact", "aot_eager"),
        ("cpu", True, "iterative", "inductor"),  # the default backend, once (its compile is slow)
        pytest.param("cuda", True, "iterative", "inductor", marks=DEVICES[1].marks),
        pytest.param("cuda", False, "exact", "inductor", marks=DEVICES[1].marks),
    ],
)
def test_compiled_byol_steps_match_eager_without_recompiling(device, trainable, refresh, backend):
    torch.manual_seed(0)
    eager = TinySimSiam(DirectPredHead(DIM, trainable=trainable, freq=2 if trainable else 1, refresh=refresh, calls_per_update="auto")).to(device)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend=backend)
    opt_eager = torch.optim.SGD(eager.parameters(), lr=0.05)
    opt_compiled = torch.optim.SGD(compiled_model.parameters(), lr=0.05)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    warm_up, steps = 2, 6
    for step in range(steps):
        x0, x1 = views(step, device)
        expected = sgd_step(eager, opt_eager, x0, x1)
        if step == warm_up:
            graphs = counters["stats"]["unique_graphs"]
        if step < warm_up:
            got = sgd_step(compiled, opt_compiled, x0, x1)
        else:
            with torch.compiler.set_stance("fail_on_recompile"):  # raises on any recompilation
                got = sgd_step(compiled, opt_compiled, x0, x1)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(compiled_model.head.corr, eager.head.corr, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(compiled_model.head.weight, eager.head.weight, rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == graphs
    assert int(compiled_model.head.num_updates) == steps  # each optimizer step ended its step
    assert int(compiled_model.head.refreshed_at) == steps  # trainable (freq 2): refreshed right after the 6th optimizer step


def test_training_step_breaks_the_graph_at_most_once_per_head_call():
    torch._dynamo.reset()
    model = TinySimSiam(DirectPredHead(DIM, refresh="iterative", calls_per_update="auto"))
    explanation = torch._dynamo.explain(model)(*views(0, "cpu"))
    print(f"\ndynamo explain, training step with two head calls: graphs={explanation.graph_count} "
          f"graph_breaks={explanation.graph_break_count}")
    assert 1 <= explanation.graph_break_count <= 2
    assert explanation.graph_count <= 3
    assert all("_training_call" in str(r.reason) for r in explanation.break_reasons)


def test_inference_compiles_into_one_graph():
    head = DirectPredHead(DIM, calls_per_update=1)
    call(head, make_batches(1)[0])
    assert not torch.equal(head.weight, torch.eye(DIM))  # a refreshed W_p, not the identity
    head.eval()
    z = make_batches(1, seed=3)[0]
    compiled = torch.compile(head, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(z), z @ head.weight.T)


# ------------------------------------------------------------------ activation checkpointing
def checkpointed_step(model, x0, x1, mode):
    """One BYOL step with each view's embedding and prediction checkpointed (or not)."""
    def predict(x):
        return model.head(model.embed(x))

    if mode is None:
        p0, p1 = predict(x0), predict(x1)
    else:
        p0 = checkpoint(predict, x0, use_reentrant=mode == "reentrant")
        p1 = checkpoint(predict, x1, use_reentrant=mode == "reentrant")
    z0, z1 = model.embed(x0).detach(), model.embed(x1).detach()
    loss = -(nn.functional.cosine_similarity(p0, z1).mean() + nn.functional.cosine_similarity(p1, z0).mean())
    loss.backward()


@pytest.mark.parametrize("trainable, calls_per_update", [(False, "auto"), (False, 2), (True, "auto")])
def test_non_reentrant_checkpointing_gives_the_gradients_of_the_unchecked_run(trainable, calls_per_update):
    torch.manual_seed(0)
    plain = TinySimSiam(DirectPredHead(DIM, calls_per_update=calls_per_update, trainable=trainable, freq=2 if trainable else 1))
    checked = copy.deepcopy(plain)
    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.1)
    opt_checked = torch.optim.SGD(checked.parameters(), lr=0.1)
    for step in range(4):
        x0, x1 = (x.requires_grad_(True) for x in views(step, "cpu"))
        # each model's whole step (its optimizer step ends its head's step) before the other's
        for model, opt, mode in ((plain, opt_plain, None), (checked, opt_checked, "non-reentrant")):
            opt.zero_grad()
            checkpointed_step(model, x0, x1, mode)
            opt.step()
        for (name, a), (_, b) in zip(plain.named_parameters(), checked.named_parameters()):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-6, atol=1e-7, msg=name)
        assert torch.equal(checked.head.weight, plain.head.weight)
        assert torch.equal(checked.head.corr, plain.head.corr)
    assert int(checked.head.num_updates) == 4  # one per step, none from recomputation


@pytest.mark.parametrize("checkpointed", ["both", "first", "second"])
def test_reentrant_checkpointing_of_any_view_raises_instead_of_silent_gradients(checkpointed):
    """Reentrant checkpointing runs the forward under no_grad: that view's statistics would be lost."""
    model = TinySimSiam(DirectPredHead(DIM, calls_per_update="auto"))
    x0, x1 = (x.requires_grad_(True) for x in views(0, "cpu"))

    def predict(x):
        return model.head(model.embed(x))

    with pytest.raises(RuntimeError, match="reentrant checkpointing runs the forward under no_grad"):
        p0 = checkpoint(predict, x0, use_reentrant=True) if checkpointed in ("both", "first") else predict(x0)
        p1 = checkpoint(predict, x1, use_reentrant=True) if checkpointed in ("both", "second") else predict(x1)
        (p0.sum() + p1.sum()).backward()


def test_a_recomputation_after_an_optimizer_step_inside_the_step_raises():
    """The optimizer moved a trainable W_p between two calls of one step: one copy cannot serve both.

    Each pending call's record holds the W_p it used; the second call used the moved one, so
    the two pending records differ and the recomputation cannot tell which one it recomputes."""
    head = DirectPredHead(DIM, calls_per_update="auto", trainable=True, freq=2)
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    head.weight.grad = torch.ones(DIM, DIM)
    z0, z1 = (z.requires_grad_(True) for z in make_batches(2))
    p0 = checkpoint(head, z0, use_reentrant=False)
    opt.step()  # before this step's backward
    p1 = checkpoint(head, z1, use_reentrant=False)
    with pytest.raises(RuntimeError, match="cannot be recomputed exactly.*W_p changed between calls whose "
                                           "backward passes are still pending"):
        (p0.sum() + p1.sum()).backward()


def test_a_step_with_untracked_training_calls_is_recomputed_exactly():
    """Training-mode calls under no_grad (a logging call beside the step) do not make the step's
    recomputation ambiguous: it uses the W_p of the calls waiting for their backward pass."""
    torch.manual_seed(0)
    plain = TinySimSiam(DirectPredHead(DIM))
    checked = copy.deepcopy(plain)
    opts = {id(m): torch.optim.SGD(m.parameters(), lr=0.1) for m in (plain, checked)}
    for step in range(3):
        x0, x1 = (x.requires_grad_(True) for x in views(step, "cpu"))
        for model, mode in ((plain, None), (checked, "non-reentrant")):
            opt = opts[id(model)]
            opt.zero_grad()

            def predict(x, model=model):
                return model.head(model.embed(x))

            p0 = predict(x0) if mode is None else checkpoint(predict, x0, use_reentrant=False)
            with torch.no_grad():
                untracked = model.head(model.embed(x0))  # training mode, no autograd: no statistics
            p1 = predict(x1) if mode is None else checkpoint(predict, x1, use_reentrant=False)
            z0, z1 = model.embed(x0).detach(), model.embed(x1).detach()
            loss = -(nn.functional.cosine_similarity(p0, z1).mean() + nn.functional.cosine_similarity(p1, z0).mean())
            loss.backward()  # recomputes both checkpointed calls, after the untracked one
            torch.testing.assert_close(untracked, p0.detach())
            opt.step()
        for (name, a), (_, b) in zip(plain.named_parameters(), checked.named_parameters()):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-6, atol=1e-7, msg=name)
            assert b.grad is not None and b.grad.abs().sum() > 0, name
        assert torch.equal(checked.head.weight, plain.head.weight)
        assert torch.equal(checked.head.corr, plain.head.corr)
    assert int(checked.head.num_updates) == 3 and checked.head.steps.calls == 0  # untracked calls: no statistics

    # a recomputation run by hand inside the backward pass gives the forward's output
    head = DirectPredHead(DIM)
    z = make_batches(1)[0].requires_grad_(True)
    out = head(z)
    with torch.no_grad():
        head(z)
    recomputed = []

    class Recompute(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            with torch.enable_grad():
                recomputed.append(head(z.detach().requires_grad_(True)).detach())  # inside the backward pass
            return grad

    Recompute.apply(out).sum().backward()
    assert len(recomputed) == 1 and torch.equal(recomputed[0], out.detach())
    assert int(head.num_updates) == 1  # the step's one call, folded once; the recomputation added nothing


def test_checkpointing_a_step_whose_calls_used_different_weights_raises():
    model = TinySimSiam(DirectPredHead(DIM, calls_per_update=1))  # refreshes between the two views
    x0, x1 = (x.requires_grad_(True) for x in views(0, "cpu"))
    with pytest.raises(RuntimeError, match="cannot be recomputed exactly.*W_p changed between calls whose "
                                           "backward passes are still pending"):
        checkpointed_step(model, x0, x1, "non-reentrant")


@pytest.mark.parametrize("regime", ["leaf inputs", "projector with an optimizer step per backward pass",
                                    "projector, accumulated"])
def test_a_pipelined_schedule_is_recomputed_exactly_or_refused(regime):
    """F0 F1 B0 F2 B1 with the head inside non-reentrant checkpointing: when a refresh falls between
    F1 and B1, F1's recomputation cannot use F2's W_p (the projector's gradient would be silently
    off); where nothing changed W_p in between, the gradients equal the unchecked run's."""

    def run(checkpointed):
        torch.manual_seed(0)
        projector = nn.Linear(12, DIM)
        head = DirectPredHead(DIM)
        optimizer = torch.optim.SGD(projector.parameters(), lr=0.1)
        gen = torch.Generator().manual_seed(1)
        inputs = [torch.randn(16, 12, generator=gen) for _ in range(3)]

        def embed(x):
            if regime == "leaf inputs":
                return x[:, :DIM].clone().requires_grad_(True)
            return projector(x)

        def forward(x):
            z = embed(x)
            p = checkpoint(head, z, use_reentrant=False) if checkpointed else head(z)
            return z, (p - z.detach()).pow(2).mean()

        def backward(loss):
            loss.backward()
            if regime == "projector with an optimizer step per backward pass":
                optimizer.step()
                optimizer.zero_grad()

        z0, l0 = forward(inputs[0])
        z1, l1 = forward(inputs[1])
        backward(l0)
        z2, l2 = forward(inputs[2])
        backward(l1)  # recomputes F1 when checkpointed
        backward(l2)
        grad = z1.grad if regime == "leaf inputs" else projector.weight.grad
        return head, grad

    if regime == "projector, accumulated":  # one optimizer step ahead: W_p is the same for F0, F1, F2
        (plain, expected), (checked, got) = run(False), run(True)
        assert torch.equal(got, expected)
        assert_same_state(snapshot(plain), snapshot(checked))
    else:  # B0 ended a step, so F2 used another W_p than F1, which is still waiting for its backward pass
        with pytest.raises(RuntimeError, match="cannot be recomputed exactly.*W_p changed between calls whose "
                                               "backward passes are still pending"):
            run(True)


# ----------------------------------------------------------------- steps with calls_per_update="auto"
def crops_step(head, crops, backward=True):
    """Every crop through the head, then one backward pass; returns the outputs."""
    outputs = [call(head, z) for z in crops]
    if backward:
        sum(out.pow(2).mean() for out in outputs).backward()
    return [out.detach() for out in outputs]


def multi_crop(step, sizes):
    return [batches64(1, batch=size, seed=100 * step + i)[0] for i, size in enumerate(sizes)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sizes", [(16, 16), (16, 16, 6, 6, 6, 6)], ids=["two-views", "multi-crop"])
def test_auto_makes_one_pooled_update_per_step_equal_to_the_reference(device, sizes):
    head = DirectPredHead(DIM, calls_per_update="auto", stats_dtype=torch.float64).to(device)
    ref = ReferenceHead(DIM)
    for step in range(5):
        crops = [c.to(device) for c in multi_crop(step, sizes)]
        outputs = crops_step(head, crops)
        # leaf inputs, nothing upstream to watch: the step's backward pass folded its pool
        assert int(head.num_updates) == step + 1 and head.steps.calls == 0
        for out, z in zip(outputs, crops):
            np.testing.assert_allclose(out.cpu().numpy(), ref.output(z.cpu().numpy()), rtol=1e-9, atol=1e-9)
        ref.fold(torch.cat(crops).cpu().numpy())
    assert int(head.num_updates) == 5
    np.testing.assert_allclose(head.corr.cpu().numpy(), ref.F, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(head.weight.cpu().numpy(), ref.W, rtol=1e-9, atol=1e-9)


def test_auto_with_gradient_accumulation_makes_one_update_per_backward_pass():
    """Leaf inputs (no parameter upstream, W_p not trainable): nothing tells the head about an
    optimizer, so each backward pass ends a step."""
    head = DirectPredHead(DIM, calls_per_update="auto", stats_dtype=torch.float64)
    ref = ReferenceHead(DIM)
    micro_batches = [multi_crop(step, (8, 8)) for step in range(6)]
    for crops in micro_batches:  # two micro-batches per optimizer step: each has its backward
        crops_step(head, crops)
        ref.fold(torch.cat(crops).numpy())
    assert int(head.num_updates) == len(micro_batches)
    np.testing.assert_allclose(head.weight.numpy(), ref.W, rtol=1e-9, atol=1e-9)


def _backward_that_misses_the_input(kind, head, outputs, zs):
    loss = sum(out.pow(2).mean() for out in outputs)
    if kind == "inputs=W_p":
        loss.backward(inputs=[head.weight])
    elif kind == "inputs=upstream":
        loss.backward(inputs=[zs[0].grad_fn.next_functions[0][0].variable])
    elif kind == "autograd.grad":
        torch.autograd.grad(loss, [zs[0]])
    elif kind == "loss on z only":
        sum(z.pow(2).mean() for z in zs).backward()


@pytest.mark.parametrize("kind", ["inputs=W_p", "inputs=upstream", "autograd.grad", "loss on z only"])
def test_auto_sees_backward_passes_that_do_not_reach_every_input(kind):
    """With parameters upstream (or a trainable W_p) the step ends at the optimizer step, however
    the backward pass before it ran: one update per optimizer step, none before it."""
    torch.manual_seed(0)
    layer = nn.Linear(DIM, DIM)
    head = DirectPredHead(DIM, calls_per_update="auto", trainable=kind == "inputs=W_p", freq=2)
    opt = torch.optim.SGD(list(layer.parameters()) + list(head.parameters()), lr=0.01)
    for step in range(4):
        xs = make_batches(2, batch=16, seed=step)
        zs = [layer(x) for x in xs]
        if kind == "inputs=W_p":
            zs = [z.detach() for z in zs]  # the loss reaches only W_p
        outputs = [head(z) for z in zs]
        opt.zero_grad()
        _backward_that_misses_the_input(kind, head, outputs, zs)
        assert int(head.num_updates) == step  # the backward pass alone does not end the step
        opt.step()
        assert int(head.num_updates) == step + 1 and head.steps.calls == 0  # the optimizer step folded it
    assert head.steps.steps == 4 and head.steps.calls == 0


def test_a_training_call_no_backward_can_reach_is_a_step_of_its_own():
    """A shape check in a notebook: a fresh head in training mode, an input without grad."""
    from directpred_plugin.lightly import DirectPredPredictionHead

    head = DirectPredPredictionHead(16, 64, 16)
    z = torch.randn(4, 16)
    out = head(z)
    assert out.shape == (4, 16) and torch.equal(out, z)  # the identity before any statistics
    assert int(head.num_updates) == 1 and head.steps.calls == 0
    np.testing.assert_allclose(head.corr.numpy(), (z.T @ z / 4).numpy(), rtol=1e-6, atol=1e-6)
    # beside an open step's pool it folds on its own and leaves the pool alone
    grad_z = torch.randn(4, 16, requires_grad=True)
    head(grad_z)
    head(torch.randn(4, 16))
    assert int(head.num_updates) == 2 and head.steps.calls == 1


def test_update_under_auto_is_an_update_of_its_own():
    head = DirectPredHead(DIM, calls_per_update="auto", stats_dtype=torch.float64)
    ref = ReferenceHead(DIM)
    step, fed = batches64(2, batch=16), batches64(1, batch=16, seed=5)[0]
    crops_step(head, step)  # a finished step (leaf inputs: folded by its backward pass)
    head.update(fed)  # this batch on its own
    ref.fold(torch.cat(step).numpy())
    ref.fold(fed.numpy())
    assert int(head.num_updates) == 2 and head.steps.calls == 0
    np.testing.assert_allclose(head.corr.numpy(), ref.F, rtol=1e-12, atol=1e-12)
    # in the middle of a step (no backward yet) it does not join that step's pool
    call(head, step[0])
    head.update(fed)
    assert int(head.num_updates) == 3 and head.steps.calls == 1


def test_update_with_an_integer_calls_per_update_counts_as_one_call():
    head = DirectPredHead(DIM, calls_per_update=2)
    z0, z1 = make_batches(2)
    head.update(z0)
    assert int(head.num_updates) == 0
    call(head, z1)
    assert int(head.num_updates) == 1


class Recorder(nn.Module):
    """Passes z through and keeps a copy of every training-mode batch, grouped by step."""

    def __init__(self):
        super().__init__()
        self.steps = [[]]

    def forward(self, z):
        if self.training and torch.is_grad_enabled():
            self.steps[-1].append(z.detach().double().clone())
        return z

    def new_step(self):
        self.steps.append([])


def _reference_after(steps, **options):
    ref = ReferenceHead(DIM, **options)
    for step_views in steps:
        ref.fold(torch.cat(step_views).numpy())
    return ref


def _check(head, steps, **options):
    """Every step whose backward pass ran is folded; nothing is left in the pool."""
    ref = _reference_after(steps, **options)
    assert int(head.num_updates) == len(steps)
    np.testing.assert_allclose(head.corr.numpy(), ref.F, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(head.weight.numpy(), ref.W, rtol=1e-8, atol=1e-10)
    assert head.steps.calls == 0


@pytest.mark.parametrize("crops", [[16, 16], [16, 16, 6, 6, 6, 6]], ids=["two-views", "multi-crop-2+4"])
def test_each_step_makes_one_update_from_all_its_views(crops):
    torch.manual_seed(0)
    projector = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, DIM)).double()
    head = DirectPredHead(DIM, calls_per_update="auto", stats_dtype=torch.float64, refresh="exact")
    recorder = Recorder()
    opt = torch.optim.SGD(projector.parameters(), lr=0.1)
    for step in range(5):
        outs = [head(recorder(projector(torch.randn(n, 5, dtype=torch.float64)))) for n in crops]
        loss = sum(o.pow(2).mean() for o in outs)
        opt.zero_grad()
        loss.backward()
        opt.step()
        recorder.new_step()
        # every view of a step was predicted with the same W_p (the one before the step)
    recorder.steps.pop()  # the empty list opened after the last backward
    _check(head, recorder.steps)


def test_gradient_accumulation_pools_the_micro_batches_of_each_optimizer_step():
    torch.manual_seed(1)
    # nonlinear, so the statistics are full rank (null eigenvalues' roots are rounding noise)
    projector = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, DIM)).double()
    head = DirectPredHead(DIM, calls_per_update="auto", stats_dtype=torch.float64, refresh="exact")
    opt = torch.optim.SGD(projector.parameters(), lr=0.1)
    recorder = Recorder()
    for micro in range(6):  # 3 optimizer steps of 2 micro-batches, 2 views each
        if micro % 2 == 0:
            step_weight = head.weight.clone()
        views = [head(recorder(projector(torch.randn(8, 5, dtype=torch.float64)))) for _ in range(2)]
        sum(v.sum() for v in views).backward()
        assert int(head.num_updates) == micro // 2  # a micro-batch's backward pass ends no step
        assert head.steps.calls == 2 * (micro % 2 + 1)
        assert torch.equal(head.weight, step_weight)  # every micro-batch of the step uses the same W_p
        if micro % 2 == 1:
            opt.step()
            opt.zero_grad()
            recorder.new_step()  # all 4 calls of the optimizer step made one update
            assert int(head.num_updates) == micro // 2 + 1 and head.steps.calls == 0
    recorder.steps.pop()
    assert [len(step_views) for step_views in recorder.steps] == [4, 4, 4]
    _check(head, recorder.steps)


def test_lightning_automatic_optimization_makes_one_update_per_step(tmp_path):
    import pytorch_lightning as pl

    torch.manual_seed(0)
    model = byol_class(pl)(calls_per_update="auto", stats_dtype=torch.float64, refresh="exact")
    model.double()
    seen = Recorder()
    model.prediction_head = nn.Sequential(seen, model.prediction_head)

    class StepMarks(pl.Callback):
        def on_train_batch_end(self, *args):
            seen.new_step()

    trainer = pl.Trainer(default_root_dir=tmp_path, **{**quiet_trainer_options(), "logger": False,
                                                      "enable_checkpointing": False, "max_steps": 4})
    trainer.callbacks.append(StepMarks())
    data = TwoViews()
    data.views = [v.double() for v in data.views]
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=8))
    seen.steps.pop()
    head = model.prediction_head[1]
    assert len(seen.steps) == 4 and all(len(v) == 2 for v in seen.steps)
    _check(head, seen.steps)


def test_auto_grouping_under_torch_compile_matches_eager():
    torch.manual_seed(2)
    projector = nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, DIM))
    eager_head = DirectPredHead(DIM, calls_per_update="auto", refresh="exact")
    compiled_head = DirectPredHead(DIM, calls_per_update="auto", refresh="exact")
    compiled_projector = nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, DIM))
    compiled_projector.load_state_dict(projector.state_dict())
    compiled = torch.compile(nn.Sequential(compiled_projector, compiled_head))
    eager = nn.Sequential(projector, eager_head)
    batches = [[torch.randn(16, 5) for _ in range(2)] for _ in range(4)]
    for model in (eager, compiled):
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for step_views in batches:
            loss = sum(model(x).pow(2).mean() for x in step_views)
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert int(compiled_head.num_updates) == int(eager_head.num_updates) == 4
    torch.testing.assert_close(compiled_head.corr, eager_head.corr, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled_head.weight, eager_head.weight, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


# ------------------------------------------------------------------ steady state on a GPU
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_cuda_steady_state_training_never_waits_for_the_device(compiled, amp):
    """After warm-up, BYOL steps with the iterative refresh (the exact one's eigh waits for
    the device) make no host-device synchronisation, under bf16 autocast too: any would
    raise in this mode."""
    torch.manual_seed(0)
    model = TinySimSiam(DirectPredHead(DIM, refresh="iterative", calls_per_update="auto")).cuda()
    step_fn = torch.compile(model) if compiled else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    inputs = [views(step, "cuda") for step in range(10)]  # copied to the device before the checked steps
    autocast = (lambda: torch.autocast("cuda", dtype=amp)) if amp else contextlib.nullcontext
    warm_up = 3  # compilation, pinned host buffers, the first lagged counter exchange
    for x0, x1 in inputs[:warm_up]:
        with autocast():
            sgd_step(step_fn, optimizer, x0, x1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x0, x1 in inputs[warm_up:]:
            with autocast():
                sgd_step(step_fn, optimizer, x0, x1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    head = model.head
    assert int(head.num_updates) == len(inputs) - 1 and int(head.num_skipped) == 0
    assert int(head.refreshed_at) == len(inputs) - 1  # every step refreshed
    exact = directpred_matrix(head.corr.double().cpu().numpy(), head.eps)
    error = np.linalg.norm(head.weight.double().cpu().numpy() - exact) / np.linalg.norm(exact)
    assert error <= 0.011


# ------------------------------------------------------------ the step's end, beside backward
@pytest.mark.parametrize("device", DEVICES)
def test_the_step_is_folded_and_refreshed_when_its_backward_pass_reaches_the_head(device):
    """Leaf inputs (nothing upstream to watch): the rest of the backward pass (here the inputs'
    gradients) runs after the fold and refresh were issued."""
    torch.manual_seed(0)
    head = DirectPredHead(DIM, calls_per_update="auto").to(device)
    reference = DirectPredHead(DIM, calls_per_update=2).to(device)
    seen = []
    for step in range(3):
        zs = [torch.randn(16, DIM, device=device, requires_grad=True) for _ in range(2)]
        for z in zs:
            z.register_hook(lambda grad: seen.append((int(head.num_updates), int(head.refreshed_at))))
        outs = [head(z) for z in zs]
        sum(out.pow(2).mean() for out in outs).backward()
        for z in zs:
            reference(z.detach())  # the same pool, closed by its second call
        assert torch.equal(head.weight, reference.weight) and torch.equal(head.corr, reference.corr)
    assert seen == [(1, 1), (1, 1), (2, 2), (2, 2), (3, 3), (3, 3)]
    if device.startswith("cuda"):  # issued on the head's side stream, waited for by backward's end
        assert head.steps._streams


@pytest.mark.parametrize("device", DEVICES)
def test_with_a_backbone_upstream_the_step_is_folded_and_refreshed_at_the_optimizer_step(device):
    """The backward pass through a backbone only marks the pool; the optimizer step ends the step."""
    torch.manual_seed(0)
    backbone = nn.Linear(5, DIM).to(device)
    opt = torch.optim.SGD(backbone.parameters(), lr=0.1)
    head = DirectPredHead(DIM, calls_per_update="auto").to(device)
    reference = DirectPredHead(DIM, calls_per_update=2).to(device)
    seen = []
    for step in range(3):
        x = torch.randn(16, 5, device=device, requires_grad=True)
        x.register_hook(lambda grad: seen.append((int(head.num_updates), int(head.refreshed_at))))
        z = backbone(x)
        outs = [head(z), head(2 * z)]
        opt.zero_grad()
        sum(out.pow(2).mean() for out in outs).backward()
        assert int(head.num_updates) == step and head.steps.calls == 2
        opt.step()
        assert int(head.num_updates) == int(head.refreshed_at) == step + 1 and head.steps.calls == 0
        reference(z.detach()), reference(2 * z.detach())  # the same pool, closed by its second call
        assert torch.equal(head.weight, reference.weight) and torch.equal(head.corr, reference.corr)
    assert seen == [(0, 0), (1, 1), (2, 2)]  # the backbone's backward pass ran before the step ended
    if device.startswith("cuda"):  # issued on the head's side stream
        assert head.steps._streams


def test_the_side_stream_is_not_copied_with_the_head():
    head = DirectPredHead(DIM, calls_per_update="auto")
    head.steps._streams[0] = object()  # what a CUDA run leaves behind
    assert copy.deepcopy(head).steps._streams == {}
    assert pickle.loads(pickle.dumps(head)).steps._streams == {}
    assert head.steps._streams  # the original keeps its own
