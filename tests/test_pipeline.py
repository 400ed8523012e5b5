"""The update pipeline against the failure classes of issue #10, one test (or more) per class:

1. torch.compile: compiled BYOL-style steps match eager, no recompiles, one graph break per head call.
2. Statistics that overflow only once pooled, or once summed over ranks, are skipped.
3. The iterative refresh never accepts a wrong W_p (tiny scales, top eigenvector hidden from start vectors).
4. A NaN batch changes no state (first call and mid-training).
5. Activation checkpointing recomputes with the W_p of the forward pass, or raises.
6. Options are validated (negative eps, non-bool flags, NumPy integers).
7. Resume across refresh strategies, from pre-pipeline checkpoints; wrong variant/dim refused.
8. The collapse indicator is a copy of the batch's value and survives empty batches.

plus ``calls_per_update="auto"``: one pooled update per training step (multi-crop, gradient
accumulation, resume). Expected values come from ``_reference.py`` (NumPy float64).
"""

import collections
import copy
import math
import os
import socket
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.checkpoint import checkpoint

from _reference import ReferenceHead, directcopy_matrix, directpred_matrix
from _spectra import fixed_vectors, stream_with_statistics, top_orthogonal_to
from directpred_plugin import DirectPredHead

DIM = 8
RULES = {"directpred": directpred_matrix, "directcopy": directcopy_matrix}
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]


def make_batches(n, batch=32, dim=DIM, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
    return [(torch.randn(batch, dim, generator=gen, dtype=torch.float64) @ mixing).to(dtype) for _ in range(n)]


def call(head, z):
    """One training-mode call, as a training step makes it."""
    return head(z.clone().requires_grad_(True))


def snapshot(head):
    return {k: v.clone() for k, v in head.state_dict().items()}


def assert_same_state(a, b, ignore=()):
    assert set(a) - set(ignore) == set(b) - set(ignore)
    for key in set(a) - set(ignore):
        assert torch.equal(a[key], b[key]), key


def exact_rule(head):
    """The exact W_p (NumPy float64) for the head's current statistics."""
    corr = head.effective_corr().detach().cpu().double().numpy()
    return RULES[head.variant](corr, head.eps)


def relative_error(weight, reference):
    return float(np.linalg.norm(weight.detach().cpu().double().numpy() - reference) / np.linalg.norm(reference))


# --------------------------------------------------------------------------- 1. torch.compile
class TinyBYOL(nn.Module):
    """Backbone, projector and a DirectPred predictor, called once per view as lightly does."""

    def __init__(self, head):
        super().__init__()
        self.backbone = nn.Linear(12, 16)
        self.projector = nn.Linear(16, DIM)
        self.head = head

    def embed(self, x):
        return self.projector(torch.relu(self.backbone(x)))

    def forward(self, x0, x1):
        z0, z1 = self.embed(x0), self.embed(x1)
        p0, p1 = self.head(z0), self.head(z1)
        loss = -(nn.functional.cosine_similarity(p0, z1.detach()).mean()
                 + nn.functional.cosine_similarity(p1, z0.detach()).mean()) / 2
        return loss, p0.detach(), p1.detach()


def views(step, device, batch=16):
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(batch, 12, generator=gen).to(device) for _ in range(2)]


def sgd_step(model, optimizer, x0, x1):
    loss, p0, p1 = model(x0, x1)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach(), p0, p1


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
    eager = TinyBYOL(DirectPredHead(DIM, trainable=trainable, refresh=refresh, calls_per_update="auto")).to(device)
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
    assert int(compiled_model.head.num_updates) == steps - 1  # the last step's pool is still open
    assert int(compiled_model.head.refreshed_at) == steps - 1


def test_training_step_breaks_the_graph_once_per_head_call():
    torch._dynamo.reset()
    model = TinyBYOL(DirectPredHead(DIM, refresh="iterative", calls_per_update="auto"))
    explanation = torch._dynamo.explain(model)(*views(0, "cpu"))
    print(f"\ndynamo explain, training step with two head calls: graphs={explanation.graph_count} "
          f"graph_breaks={explanation.graph_break_count}")
    assert explanation.graph_break_count == 2
    assert explanation.graph_count == 3


def test_inference_compiles_into_one_graph():
    head = DirectPredHead(DIM)
    call(head, make_batches(1)[0])
    head.eval()
    z = make_batches(1, seed=3)[0]
    compiled = torch.compile(head, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(z), z @ head.weight.T)


# ---------------------------------------------------------- 2. overflow after pooling / all-reduce
def overflowing_row(scale_of_sum=1.2):
    """One row whose z^T z is finite in float32 but whose double is not (max ~3.4e38)."""
    value = math.sqrt(torch.finfo(torch.float32).max / scale_of_sum)
    return torch.full((1, DIM), value)


def test_pool_that_overflows_only_once_pooled_is_skipped_and_training_resumes():
    batches = make_batches(6)
    head = DirectPredHead(DIM, calls_per_update=2)
    ref = ReferenceHead(DIM)
    for view0, view1 in zip(batches[0:2:2], batches[1:2:2]):
        call(head, view0), call(head, view1)
        ref.fold(torch.cat([view0, view1]).double().numpy())
    before = snapshot(head)
    row = overflowing_row()
    assert torch.isfinite(row.T @ row).all() and not torch.isfinite(2 * (row.T @ row)).all()
    with pytest.warns(RuntimeWarning, match="non-finite"):
        call(head, row), call(head, row)
    assert int(head.num_skipped) == 1
    assert_same_state(before, snapshot(head), ignore=["num_skipped"])
    for view0, view1 in zip(batches[2::2], batches[3::2]):
        call(head, view0), call(head, view1)
        ref.fold(torch.cat([view0, view1]).double().numpy())
    assert int(head.num_updates) == ref.updates == 3
    assert torch.isfinite(head.corr).all()
    np.testing.assert_allclose(head.weight.numpy(), ref.W, atol=1e-4)


DDP_STEPS, DDP_OVERFLOW_STEP = 5, 2


def _ddp_batches(rank):
    batches = make_batches(DDP_STEPS, batch=4 + 3 * rank, seed=50 + rank)
    batches[DDP_OVERFLOW_STEP] = overflowing_row()  # finite on each rank, inf once summed
    return batches


def _ddp_overflow_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        head = DirectPredHead(DIM, refresh="exact")
        weights = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for z in _ddp_batches(rank):
                call(head, z)
                weights.append(head.weight.clone())
        torch.save({"state": head.state_dict(), "weights": weights}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_pool_that_overflows_only_after_the_all_reduce_is_skipped_on_every_rank(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_overflow_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert_same_state(ranks[0]["state"], ranks[1]["state"])
    state, weights = ranks[0]["state"], ranks[0]["weights"]
    assert int(state["num_skipped"]) == 1 and int(state["num_updates"]) == DDP_STEPS - 1
    assert torch.isfinite(state["corr"]).all()
    assert torch.equal(weights[DDP_OVERFLOW_STEP], weights[DDP_OVERFLOW_STEP - 1])  # frozen by the skip only
    assert not torch.equal(weights[-1], weights[DDP_OVERFLOW_STEP])  # and updated again afterwards
    ref = ReferenceHead(DIM)
    for step, (z0, z1) in enumerate(zip(_ddp_batches(0), _ddp_batches(1))):
        if step != DDP_OVERFLOW_STEP:
            ref.fold(torch.cat([z0, z1]).double().numpy())
    np.testing.assert_allclose(state["weight"].numpy(), ref.W, atol=1e-4)


# --------------------------------------------------------------- 3. the iterative refresh is sound
def assert_every_refresh_accurate_or_kept(head, batches, tol):
    """After every call W_p is within ``tol`` of the exact rule on the head's F_hat, or unchanged."""
    for z in batches:
        before = head.weight.detach().clone()
        call(head, z)
        if not torch.equal(head.weight, before):
            assert relative_error(head.weight, exact_rule(head)) <= tol
    assert relative_error(head.weight, exact_rule(head)) <= tol  # rejections end in an exact refresh


@pytest.mark.parametrize("variant", ["directpred", "directcopy"])
def test_iterative_refresh_at_input_scale_1e_12_in_float32_is_accurate_or_refused(variant):
    batches = [b * 1e-12 for b in make_batches(4, batch=6)]  # 6 rows < dim: rank-deficient too
    head = DirectPredHead(DIM, variant=variant, refresh="iterative")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a refusal warns; what matters is the weight
        assert_every_refresh_accurate_or_kept(head, batches, tol=0.011)


@pytest.mark.parametrize("start", ["ones", "e0", "seeded-randn"])
@pytest.mark.parametrize("variant", ["directpred", "directcopy"])
def test_iterative_refresh_finds_a_top_eigenvector_orthogonal_to_fixed_start_vectors(variant, start):
    dim = 24
    matrix = top_orthogonal_to(fixed_vectors(dim)[start], dim=dim)
    head = DirectPredHead(dim, variant=variant, refresh="iterative")
    reference = RULES[variant](matrix.numpy(), head.eps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for z in stream_with_statistics(matrix, 3):
            before = head.weight.detach().clone()
            call(head, z.float())
            if not torch.equal(head.weight, before):
                assert relative_error(head.weight, reference) <= 0.011
    assert relative_error(head.weight, reference) <= 0.011


# ------------------------------------------------------------------------ 4. NaN changes nothing
def nan_batch(seed=7):
    z = make_batches(1, seed=seed)[0]
    z[3, 2] = float("nan")
    return z


def test_nan_batch_on_the_first_call_keeps_the_identity():
    head = DirectPredHead(DIM)
    before = snapshot(head)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = call(head, nan_batch())
    assert torch.equal(head.weight, torch.eye(DIM))  # not eps * I
    assert_same_state(before, snapshot(head), ignore=["num_skipped"])
    assert int(head.num_skipped) == 1
    assert out.shape == (32, DIM)
    assert any("non-finite" in str(w.message) for w in record)


@pytest.mark.parametrize("refresh", ["exact", "iterative"])
def test_nan_batch_mid_training_changes_no_state_bit_for_bit(refresh):
    head = DirectPredHead(DIM, refresh=refresh)
    for z in make_batches(3):
        call(head, z)
    before = snapshot(head)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        call(head, nan_batch())
    assert_same_state(before, snapshot(head), ignore=["num_skipped"])
    assert int(head.num_skipped) == 1
    assert any("non-finite" in str(w.message) for w in record)


# ------------------------------------------------------------------ 5. activation checkpointing
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


@pytest.mark.parametrize("calls_per_update", ["auto", 2])
@pytest.mark.parametrize("trainable", [False, True])
def test_non_reentrant_checkpointing_gives_the_gradients_of_the_unchecked_run(trainable, calls_per_update):
    torch.manual_seed(0)
    plain = TinyBYOL(DirectPredHead(DIM, calls_per_update=calls_per_update, trainable=trainable))
    checked = copy.deepcopy(plain)
    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.1)
    opt_checked = torch.optim.SGD(checked.parameters(), lr=0.1)
    for step in range(4):
        x0, x1 = (x.requires_grad_(True) for x in views(step, "cpu"))
        for model, opt, mode in ((plain, opt_plain, None), (checked, opt_checked, "non-reentrant")):
            opt.zero_grad()
            checkpointed_step(model, x0, x1, mode)
        for (name, a), (_, b) in zip(plain.named_parameters(), checked.named_parameters()):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-6, atol=1e-7, msg=name)
        for opt in (opt_plain, opt_checked):
            opt.step()
        assert torch.equal(checked.head.weight, plain.head.weight)
        assert torch.equal(checked.head.corr, plain.head.corr)
    assert int(checked.head.num_updates) == (3 if calls_per_update == "auto" else 4)  # none from recomputation


def test_reentrant_checkpointing_raises_instead_of_silent_gradients():
    model = TinyBYOL(DirectPredHead(DIM, calls_per_update="auto"))
    x0, x1 = (x.requires_grad_(True) for x in views(0, "cpu"))
    with pytest.raises(RuntimeError, match="no training-mode call of this step was seen"):
        checkpointed_step(model, x0, x1, "reentrant")


def test_checkpointing_a_step_whose_calls_used_different_weights_raises():
    model = TinyBYOL(DirectPredHead(DIM, calls_per_update=1))  # refreshes between the two views
    x0, x1 = (x.requires_grad_(True) for x in views(0, "cpu"))
    with pytest.raises(RuntimeError, match="W_p changed between the calls of this step"):
        checkpointed_step(model, x0, x1, "non-reentrant")


# ------------------------------------------------------------------------------ 6. validation
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(eps=-2.0), "eps"),
        (dict(trainable="no"), "trainable"),
        (dict(center="False"), "center"),
        (dict(sync_dist=1), "sync_dist"),
        (dict(calls_per_update="two"), "calls_per_update"),
        (dict(calls_per_update=1.5), "calls_per_update"),
        (dict(freq=True), "freq"),
        (dict(rho=float("inf")), "rho"),
    ],
)
def test_invalid_options_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DirectPredHead(DIM, **kwargs)


def test_numpy_integers_are_accepted():
    head = DirectPredHead(np.int64(DIM), freq=np.int32(2), calls_per_update=np.int64(2))
    assert (head.dim, head.freq, head.calls_per_update) == (DIM, 2, 2)
    assert all(type(v) is int for v in (head.dim, head.freq, head.calls_per_update))
    assert head.weight.shape == (DIM, DIM)


# ----------------------------------------------------------------------------------- 7. resume
@pytest.mark.parametrize("saved_with, loaded_with", [("iterative", "exact"), ("auto", "exact"),
                                                     ("exact", "iterative"), ("exact", "auto"),
                                                     ("iterative", "auto")])
def test_resume_across_refresh_strategies(saved_with, loaded_with):
    batches = make_batches(6)
    first = DirectPredHead(DIM, refresh=saved_with)
    for z in batches[:3]:
        call(first, z)
    state = first.state_dict()
    resumed = DirectPredHead(DIM, refresh=loaded_with)
    resumed.load_state_dict(state)  # strict: no missing or unexpected keys
    for key in ("weight", "corr", "num_updates"):
        assert torch.equal(getattr(resumed, key), state[key])
    ref = ReferenceHead(DIM)
    ref.run([z.double().numpy() for z in batches])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for z in batches[3:]:
            call(resumed, z)
    assert relative_error(resumed.weight, ref.W) <= 0.011


def pre_pipeline_state_dict(head, refresh):
    """The state dict the head of commit ebb1e01 saved: no pools or refresh counters, a warm
    start (float64) and a fallback counter in the iterative strategy, version 1."""
    own = head.state_dict()
    state = collections.OrderedDict((k, own[k].clone()) for k in ("weight", "corr", "num_updates", "num_skipped"))
    warm = torch.randn(DIM, dtype=torch.float64)
    metadata = [("", {"version": 1}), ("refresher", {"version": 1})]
    if refresh == "iterative":
        state.update({"refresher.warm": warm, "refresher.fallbacks": torch.tensor(2)})
        metadata.append(("refresher.exact", {"version": 1}))
    elif refresh == "auto":
        state.update({"refresher.iterative.warm": warm, "refresher.iterative.fallbacks": torch.tensor(0)})
        metadata += [("refresher.iterative", {"version": 1}), ("refresher.iterative.exact", {"version": 1}),
                     ("refresher.exact", {"version": 1})]
    state._metadata = collections.OrderedDict(metadata)
    return state


@pytest.mark.parametrize("old_refresh", ["iterative", "auto", "exact"])
@pytest.mark.parametrize("new_refresh", ["exact", "iterative"])
def test_pre_pipeline_checkpoint_with_a_warm_start_loads_and_continues_exactly(old_refresh, new_refresh):
    batches = make_batches(6)
    straight = DirectPredHead(DIM, refresh=new_refresh)
    for z in batches[:3]:
        call(straight, z)
    old = pre_pipeline_state_dict(straight, old_refresh)
    resumed = DirectPredHead(DIM, refresh=new_refresh)
    resumed.load_state_dict(old)
    assert int(resumed.refreshed_at) == 3  # W_p was refreshed at the last update
    for z in batches[3:]:
        assert torch.equal(call(resumed, z), call(straight, z))
    assert_same_state(snapshot(straight), snapshot(resumed))


@pytest.mark.parametrize("other, match", [(dict(variant="directcopy"), "variant='directcopy'"),
                                          (dict(dim=DIM + 2), f"dim={DIM + 2}")])
def test_checkpoint_of_another_variant_or_dim_is_refused_with_a_clear_error(other, match):
    saved = DirectPredHead(**{"dim": DIM, **other})
    call(saved, make_batches(1, dim=saved.dim)[0])
    head = DirectPredHead(DIM)
    before = snapshot(head)
    with pytest.raises(RuntimeError, match=match):
        head.load_state_dict(saved.state_dict())
    assert_same_state(before, snapshot(head))
    # the refusal also holds inside a model (prefixed keys)
    model = nn.Sequential(nn.Identity(), DirectPredHead(DIM))
    with pytest.raises(RuntimeError, match=match):
        model.load_state_dict(nn.Sequential(nn.Identity(), saved).state_dict())


# ---------------------------------------------------------------------- 8. collapse indicator
def collapse_of(z):
    """Mean over dimensions of the population std of the l2-normalised rows (NumPy)."""
    rows = z.detach().double().numpy()
    rows = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return float(rows.std(axis=0).mean())


def test_collapse_indicator_ignores_in_place_edits_of_the_callers_z():
    head = DirectPredHead(DIM)
    batch = make_batches(1)[0]
    z = batch.clone().requires_grad_(True)  # float32 like the statistics: no copy on the way in
    head(z)
    with torch.no_grad():
        z.fill_(1.0)  # a fully collapsed batch, written after the call and before any read
    reported = head.diagnostics()["collapse"]
    assert reported == pytest.approx(collapse_of(batch), rel=1e-5)
    assert reported > 0.1


def test_empty_batch_leaves_the_collapse_indicator_finite_and_state_unchanged():
    head = DirectPredHead(DIM)
    call(head, make_batches(1)[0])
    reported = head.diagnostics()["collapse"]
    before = snapshot(head)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about either
        out = call(head, torch.empty(0, DIM))
    assert out.shape == (0, DIM)
    assert head.diagnostics()["collapse"] == reported
    assert_same_state(before, snapshot(head), ignore=["num_empty"])
    assert int(head.num_empty) == 1  # a step for the refresh schedule, and nothing else


# ------------------------------------------------------------------ calls_per_update="auto"
def byol_step(head, crops, backward=True):
    """Every crop through the head, then one backward pass; returns the outputs."""
    outputs = [head(z.clone().requires_grad_(True)) for z in crops]
    if backward:
        sum(out.pow(2).mean() for out in outputs).backward()
    return [out.detach() for out in outputs]


def multi_crop(step, sizes):
    return [make_batches(1, batch=size, seed=100 * step + i)[0] for i, size in enumerate(sizes)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sizes", [(16, 16), (16, 16, 6, 6, 6, 6)], ids=["two-views", "multi-crop"])
def test_auto_makes_one_pooled_update_per_step_equal_to_the_reference(device, sizes):
    head = DirectPredHead(DIM, calls_per_update="auto", stats_dtype=torch.float64).to(device)
    ref = ReferenceHead(DIM)
    for step in range(5):
        crops = [c.double().to(device) for c in multi_crop(step, sizes)]
        outputs = byol_step(head, crops)
        # the step's pool is folded by the next step's first call
        assert int(head.num_updates) == step and int(head.pending_calls) == len(sizes)
        for out, z in zip(outputs, crops):
            np.testing.assert_allclose(out.cpu().numpy(), ref.output(z.cpu().numpy()), rtol=1e-9, atol=1e-9)
        ref.fold(torch.cat(crops).cpu().numpy())
    byol_step(head, [multi_crop(5, sizes)[0].double().to(device)])  # folds step 4's pool
    assert int(head.num_updates) == 5
    np.testing.assert_allclose(head.corr.cpu().numpy(), ref.F, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(head.weight.cpu().numpy(), ref.W, rtol=1e-9, atol=1e-9)


def test_auto_with_gradient_accumulation_makes_one_update_per_backward_pass():
    head = DirectPredHead(DIM, calls_per_update="auto", stats_dtype=torch.float64)
    ref = ReferenceHead(DIM)
    micro_batches = [multi_crop(step, (8, 8)) for step in range(6)]
    for crops in micro_batches:  # two micro-batches per optimizer step: each has its backward
        byol_step(head, [c.double() for c in crops])
        ref.fold(torch.cat(crops).double().numpy())
    byol_step(head, [micro_batches[0][0].double()])
    assert int(head.num_updates) == len(micro_batches)
    np.testing.assert_allclose(head.weight.numpy(), ref.W, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("where", ["between-steps", "between-views"])
def test_auto_resume_mid_run_is_identical_to_uninterrupted(tmp_path, where):
    steps = [multi_crop(step, (12, 12)) for step in range(6)]

    def run(head, crops_per_step):
        return [out for crops in crops_per_step for out in byol_step(head, crops)]

    straight = DirectPredHead(DIM, calls_per_update="auto", freq=2)
    expected = run(straight, steps)

    first = DirectPredHead(DIM, calls_per_update="auto", freq=2)
    got = run(first, steps[:3])
    if where == "between-views":  # saved after the first view of step 3, before its backward
        z = steps[3][0].clone().requires_grad_(True)
        out = first(z)
        got.append(out.detach())
    torch.save(first.state_dict(), tmp_path / "head.pt")
    resumed = DirectPredHead(DIM, calls_per_update="auto", freq=2)
    resumed.load_state_dict(torch.load(tmp_path / "head.pt", weights_only=True))
    if where == "between-views":
        second = resumed(steps[3][1].clone().requires_grad_(True))
        (out.pow(2).mean() + second.pow(2).mean()).backward()
        got.append(second.detach())
        got += run(resumed, steps[4:])
    else:
        got += run(resumed, steps[3:])
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    assert_same_state(snapshot(straight), snapshot(resumed))


# ------------------------------------------------------------------ steady state on a GPU
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("compiled", [False, True])
def test_cuda_steady_state_training_never_waits_for_the_device(compiled):
    """After warm-up, BYOL steps with the iterative refresh (the exact one's eigh waits for
    the device) make no host-device synchronisation: any would raise in this mode."""
    torch.manual_seed(0)
    model = TinyBYOL(DirectPredHead(DIM, refresh="iterative", calls_per_update="auto")).cuda()
    step_fn = torch.compile(model) if compiled else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    inputs = [views(step, "cuda") for step in range(10)]  # copied to the device before the checked steps
    warm_up = 3  # compilation, pinned host buffers, the first lagged counter exchange
    for x0, x1 in inputs[:warm_up]:
        sgd_step(step_fn, optimizer, x0, x1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x0, x1 in inputs[warm_up:]:
            sgd_step(step_fn, optimizer, x0, x1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    head = model.head
    assert int(head.num_updates) == len(inputs) - 1 and int(head.num_skipped) == 0
    assert int(head.refreshed_at) == len(inputs) - 1  # every step refreshed
    assert relative_error(head.weight, exact_rule(head)) <= 0.011


def test_resume_keeps_the_refresh_schedule_across_empty_steps():
    """freq counts every closed pool, empty ones included; a resumed run must count them too."""
    kwargs = dict(freq=2)
    sequence = [torch.empty(0, DIM)] + make_batches(4)
    straight = DirectPredHead(DIM, **kwargs)
    expected = [call(straight, z) for z in sequence]
    first = DirectPredHead(DIM, **kwargs)
    got = [call(first, sequence[0])]
    resumed = DirectPredHead(DIM, **kwargs)
    resumed.load_state_dict(first.state_dict())
    got += [call(resumed, z) for z in sequence[1:]]
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    assert_same_state(snapshot(straight), snapshot(resumed))
