import io
import warnings

import numpy as np
import pytest
import torch

from _reference import ReferenceHead, directpred_matrix
from directpred_plugin import DirectPredHead

DIM = 8


def make_batches(n_batches=12, batch=32, dim=DIM, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, dim, generator=gen, dtype=dtype)
    return [torch.randn(batch, dim, generator=gen, dtype=dtype) @ mixing for _ in range(n_batches)]


def train_calls(head, batches):
    """Training-mode calls with autograd on, as in a real training step."""
    head.train()
    outputs = []
    for z in batches:
        outputs.append(head(z.clone().requires_grad_(True)).detach())
    return outputs


def snapshot(head):
    return {k: v.clone() for k, v in head.state_dict().items()}


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("variant", ["directpred", "directcopy"])
@pytest.mark.parametrize("freq", [1, 3])
@pytest.mark.parametrize("center", [False, True])
def test_matches_reference_recurrence(variant, freq, center):
    batches = make_batches()
    head = DirectPredHead(DIM, rho=0.3, eps=0.05, freq=freq, variant=variant, center=center, stats_dtype=torch.float64)
    ref = ReferenceHead(DIM, rho=0.3, eps=0.05, freq=freq, variant=variant, center=center)
    for z in batches:
        expected = ref.output(z.numpy())
        got = head(z.clone().requires_grad_(True))
        ref.fold(z.numpy())
        np.testing.assert_allclose(got.detach().numpy(), expected, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(head.weight.numpy(), ref.W, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(head.corr.numpy(), ref.F, rtol=1e-12, atol=1e-12)
    assert int(head.num_updates) == len(batches)


def test_float32_statistics_track_reference():
    batches = [b.float() for b in make_batches()]
    head = DirectPredHead(DIM)
    ref = ReferenceHead(DIM)
    outs = train_calls(head, batches)
    expected = ref.run([b.double().numpy() for b in batches])
    for got, exp in zip(outs, expected):
        np.testing.assert_allclose(got.numpy(), exp, rtol=1e-4, atol=1e-4)
    assert head.corr.dtype == torch.float32 and head.weight.dtype == torch.float32


def test_first_call_uses_identity_and_current_batch_only_afterwards():
    z0, z1 = make_batches(2)
    head = DirectPredHead(DIM, stats_dtype=torch.float64)
    out0 = head(z0.clone().requires_grad_(True))
    assert torch.equal(out0.detach(), z0)  # identity before any statistics
    np.testing.assert_allclose(head.corr.numpy(), (z0.T @ z0 / len(z0)).numpy(), rtol=1e-12)
    np.testing.assert_allclose(head.weight.numpy(), directpred_matrix(head.corr.numpy(), 0.01), atol=1e-10)
    out1 = head(z1.clone().requires_grad_(True))
    np.testing.assert_allclose(out1.detach().numpy(), z1.numpy() @ directpred_matrix((z0.T @ z0 / 32).numpy(), 0.01).T, atol=1e-9)


def test_freq_keeps_identity_until_the_freq_th_update():
    head = DirectPredHead(DIM, freq=4, stats_dtype=torch.float64)
    for k, z in enumerate(make_batches(4), start=1):
        head(z.clone().requires_grad_(True))
        if k < 4:
            assert torch.equal(head.weight, torch.eye(DIM, dtype=torch.float64))
    assert not torch.equal(head.weight, torch.eye(DIM, dtype=torch.float64))


def test_eval_mode_and_no_grad_change_nothing():
    head = DirectPredHead(DIM)
    train_calls(head, [b.float() for b in make_batches(3)])
    before = snapshot(head)
    z = make_batches(1, seed=5)[0].float()
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
    head = DirectPredHead(DIM)
    train_calls(head, [b.float() for b in make_batches(3)])
    w_before = head.weight.clone()
    z = make_batches(1, seed=9)[0].float().requires_grad_(True)
    out = head(z)
    assert not torch.equal(head.weight, w_before)  # refreshed during the call
    grad = torch.randn_like(out)
    out.backward(grad)
    torch.testing.assert_close(z.grad, grad @ w_before)


@pytest.mark.parametrize("freq", [1, 5])
def test_trainable_hybrid_trains_between_refreshes(freq):
    head = DirectPredHead(DIM, freq=freq, trainable=True)
    assert isinstance(head.weight, torch.nn.Parameter)
    assert [name for name, _ in head.named_parameters()] == ["weight"]
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    batches = [b.float() for b in make_batches(10)]
    ref = ReferenceHead(DIM, freq=freq)
    for k, z in enumerate(batches, start=1):
        # two views per step, as lightly/solo call the predictor: backward must not trip
        # over the in-place refresh of W_p
        a, b = z[:16].clone().requires_grad_(True), z[16:].clone().requires_grad_(True)
        w_start = head.weight.detach().clone()
        loss = (head(a) - 1).pow(2).mean() + (head(b) + 1).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
        ref.fold(z[:16].double().numpy())
        ref.fold(z[16:].double().numpy())
        if ref.updates % freq in (0, 1) and ref.updates >= freq:
            # a refresh in this step overwrote whatever gradient steps did before
            np.testing.assert_allclose(head.weight.detach().numpy(), ref.W, atol=1e-4)
        else:
            assert torch.equal(head.weight.detach(), w_start)
        w_before_step = head.weight.detach().clone()
        opt.step()
        assert not torch.allclose(head.weight.detach(), w_before_step)
    assert not np.allclose(head.weight.detach().numpy(), ref.W, atol=1e-4)  # final step trained it


def test_calls_per_update_pools_views_like_the_paper():
    batches = make_batches(8)
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


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e30])
def test_nonfinite_batch_is_skipped_with_one_warning(bad):
    batches = [b.float() for b in make_batches(6)]
    head = DirectPredHead(DIM)
    train_calls(head, batches[:3])
    before = snapshot(head)
    poisoned = batches[3].clone()
    poisoned[2, 1] = bad
    if bad == 1e30:
        poisoned[2] = bad  # finite input whose correlation overflows float32
    with pytest.warns(RuntimeWarning, match="non-finite") as record:
        out = head(poisoned.clone().requires_grad_(True))
        head(poisoned.clone().requires_grad_(True))
    assert len([w for w in record if "non-finite" in str(w.message)]) == 1
    assert out.shape == poisoned.shape
    after = snapshot(head)
    after.pop("num_skipped"), before.pop("num_skipped")
    assert_same_state(before, after)
    assert int(head.num_skipped) == 2
    # training continues as if the bad batches had never been seen
    ref = ReferenceHead(DIM)
    ref.run([b.double().numpy() for b in batches[:3]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_calls(head, batches[4:])
    ref.run([b.double().numpy() for b in batches[4:]])
    np.testing.assert_allclose(head.weight.numpy(), ref.W, atol=1e-4)


def test_batch_size_one_and_zero_batch():
    head = DirectPredHead(DIM, stats_dtype=torch.float64)
    ref = ReferenceHead(DIM)
    singles = [z[:1] for z in make_batches(5)]
    for z in singles:
        head(z.clone().requires_grad_(True))
        ref.fold(z.numpy())
    np.testing.assert_allclose(head.weight.numpy(), ref.W, atol=1e-9)
    zeros = DirectPredHead(DIM, eps=0.1)
    zeros(torch.zeros(4, DIM, requires_grad=True))
    assert torch.allclose(zeros.weight, 0.1 * torch.eye(DIM))


@pytest.mark.parametrize(
    "shape", [(DIM,), (4, DIM + 1), (2, 4, DIM), (4, 1)]
)
def test_wrong_shape_raises_value_error_naming_expected_shape(shape):
    head = DirectPredHead(DIM)
    with pytest.raises(ValueError, match=rf"\(batch, {DIM}\)"):
        head(torch.randn(*shape))


def test_non_float_input_and_bad_options_raise():
    with pytest.raises(ValueError, match="floating-point"):
        DirectPredHead(DIM)(torch.ones(4, DIM, dtype=torch.long))
    with pytest.raises(TypeError, match="torch.Tensor"):
        DirectPredHead(DIM)(np.ones((4, DIM)))
    for kwargs, match in [
        (dict(rho=1.0), "rho"),
        (dict(rho=-0.1), "rho"),
        (dict(freq=0), "freq"),
        (dict(eps=float("nan")), "eps"),
        (dict(variant="bogus"), "directcopy"),
        (dict(refresh="bogus"), "exact"),
        (dict(stats_dtype=torch.float16), "stats_dtype"),
        (dict(calls_per_update=0), "calls_per_update"),
    ]:
        with pytest.raises(ValueError, match=match):
            DirectPredHead(DIM, **kwargs)
    with pytest.raises(ValueError, match="dim"):
        DirectPredHead(0)


@pytest.mark.parametrize("trainable", [False, True])
@pytest.mark.parametrize("calls_per_update", [1, 2])
def test_resume_mid_run_is_identical_to_uninterrupted(tmp_path, trainable, calls_per_update):
    batches = [b.float() for b in make_batches(11)]
    kwargs = dict(freq=2, trainable=trainable, calls_per_update=calls_per_update, center=True)

    def run(head, opt, zs):
        outs = []
        for z in zs:
            out = head(z.clone().requires_grad_(True))
            if trainable:
                opt.zero_grad()
                out.pow(2).mean().backward()
                opt.step()
            outs.append(out.detach())
        return outs

    def optimizer(head):
        return torch.optim.SGD(head.parameters(), lr=0.05, momentum=0.9) if trainable else None

    straight = DirectPredHead(DIM, **kwargs)
    opt = optimizer(straight)
    expected = run(straight, opt, batches)

    first = DirectPredHead(DIM, **kwargs)
    opt1 = optimizer(first)
    outs = run(first, opt1, batches[:5])  # odd: mid-group when calls_per_update=2
    path = tmp_path / "ckpt.pt"
    torch.save({"head": first.state_dict(), "opt": opt1.state_dict() if trainable else None}, path)
    ckpt = torch.load(path, weights_only=True)
    resumed = DirectPredHead(DIM, **kwargs)
    resumed.load_state_dict(ckpt["head"])
    opt2 = optimizer(resumed)
    if trainable:
        opt2.load_state_dict(ckpt["opt"])
    outs += run(resumed, opt2, batches[5:])
    for a, b in zip(outs, expected):
        assert torch.equal(a, b)
    assert_same_state(snapshot(straight), snapshot(resumed))
    state = first.state_dict()
    assert {"weight", "corr", "num_updates"} <= set(state)


def test_state_dict_contents():
    head = DirectPredHead(DIM)
    train_calls(head, [b.float() for b in make_batches(3)])
    state = head.state_dict()
    assert int(state["num_updates"]) == 3
    assert torch.equal(state["corr"], head.corr) and torch.equal(state["weight"], head.weight)


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
    ref = ReferenceHead(DIM)
    xs = [b.float() for b in make_batches(4)]
    for x in xs:
        with torch.autocast("cpu", dtype=amp_dtype):
            z = layer(x)
            assert z.dtype == amp_dtype
            out = head(z)
        assert out.dtype == amp_dtype
        out.float().sum().backward()
        ref.fold(z.detach().double().numpy())
    assert head.corr.dtype == torch.float32
    assert seen and set(seen) == {torch.float32}
    np.testing.assert_allclose(head.weight.numpy(), ref.W, atol=1e-4)
    with torch.autocast("cpu", dtype=amp_dtype):
        assert head(xs[0]).dtype == torch.float32  # fp32 input stays fp32


def test_half_and_dtype_casts_keep_statistics_in_stats_dtype():
    head = DirectPredHead(DIM)
    train_calls(head, [b.float() for b in make_batches(3)])
    corr = head.corr.clone()
    head.half()
    assert head.corr.dtype == torch.float32 and torch.equal(head.corr, corr)
    out = head(torch.randn(5, DIM, dtype=torch.float16, requires_grad=True))
    assert out.dtype == torch.float16
    head.to(torch.float64)
    assert head.corr.dtype == torch.float32
    trainable = DirectPredHead(DIM, trainable=True).double()
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
    batches = [b.float() for b in make_batches(3)]
    head = DirectPredHead(DIM)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_calls(head, batches)
    ref = ReferenceHead(DIM)
    ref.run([b.double().numpy() for b in batches])
    np.testing.assert_allclose(head.weight.numpy(), ref.W, atol=1e-5)


def test_eigh_failure_in_every_dtype_keeps_previous_weight(monkeypatch):
    batches = [b.float() for b in make_batches(4)]
    head = DirectPredHead(DIM)
    train_calls(head, batches[:2])
    weight = head.weight.clone()
    monkeypatch.setattr(
        torch.linalg, "eigh", _failing_eigh(torch.linalg.eigh, {torch.float32, torch.float64}, "raise")
    )
    with pytest.warns(RuntimeWarning, match="keeping the previous W_p") as record:
        train_calls(head, batches[2:])
    assert len(record) == 1
    assert torch.equal(head.weight, weight)
    assert int(head.num_updates) == 4  # statistics still advance
    monkeypatch.undo()
    assert head.diagnostics()["refresh_failures"] == 2


def test_diagnostics_report_alignment_collapse_and_spectra():
    head = DirectPredHead(DIM)
    assert np.isnan(head.alignment())
    train_calls(head, [b.float() for b in make_batches(4)])
    diag = head.diagnostics()
    assert diag["alignment"] == pytest.approx(1.0, abs=1e-6)
    assert 0 < diag["collapse"] <= DIM**-0.5 + 1e-6
    spectra = head.spectra()
    assert spectra["corr"][0] == pytest.approx(diag["corr_eig_max"])
    assert diag["weight_eig_max"] == pytest.approx(1.0 + head.eps, rel=1e-5)
    assert torch.all(spectra["corr"][:-1] >= spectra["corr"][1:])
    assert 1.0 <= diag["corr_effective_rank"] <= DIM
    with torch.no_grad():
        head.weight.copy_(torch.randn(DIM, DIM))
    assert head.alignment() < 0.9
    collapsed = DirectPredHead(DIM)
    collapsed(torch.ones(16, DIM, requires_grad=True))
    assert collapsed.diagnostics()["collapse"] == pytest.approx(0.0, abs=1e-7)
