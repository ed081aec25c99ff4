"""SSL objective: Sinkhorn-Knopp, DINO, iBOT, KoLeo, the chunked soft cross-entropy, distributed Sinkhorn."""

import math
import os
import socket
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dinocell.loss import (
    DINOLoss,
    KoLeoLoss,
    combine_dino_terms,
    dino_term_weights,
    iBOTPatchLoss,
    masked_patch_weights,
    sinkhorn_knopp,
    soft_cross_entropy_sum,
    total_loss,
)

torch.set_num_threads(1)


def ce(teacher_row, student_row, temp=0.1):
    """Reference CE of one (teacher, student) pair, float64."""
    return -(teacher_row.double() * torch.log_softmax(student_row.double() / temp, dim=-1)).sum()


# ---------------------------------------------------------------- soft cross-entropy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_elements", [1, 12, 1 << 26])
def test_soft_cross_entropy_matches_autograd_reference(dtype, chunk_elements):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 6, generator=gen).to(dtype).requires_grad_()
    targets = torch.softmax(torch.randn(3, 5, 6, generator=gen), dim=-1)
    weights = torch.rand(5, generator=gen)

    got = soft_cross_entropy_sum(logits, targets, 0.1, weights, chunk_elements=chunk_elements)
    reference = -(targets * torch.log_softmax(logits.float() / 0.1, dim=-1)).sum(-1).mul(weights).sum()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)

    (grad_got,) = torch.autograd.grad(got, logits)
    (grad_ref,) = torch.autograd.grad(reference, logits)
    assert grad_got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(grad_got.float(), grad_ref.float(), rtol=tol, atol=tol)


def test_soft_cross_entropy_broadcasts_one_target_over_crops():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 3, 5, generator=gen, requires_grad=True)
    target = torch.softmax(torch.randn(3, 5, generator=gen), dim=-1)
    got = soft_cross_entropy_sum(logits, target, 0.2, chunk_elements=5)
    expected = sum(ce(target[b], logits[s, b], 0.2) for s in range(4) for b in range(3))
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_soft_cross_entropy_rejects_targets_that_require_grad_and_bad_shapes():
    logits = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="must not require grad"):
        soft_cross_entropy_sum(logits, torch.rand(2, 3, 4, requires_grad=True), 0.1)
    with pytest.raises(ValueError, match="does not match"):
        soft_cross_entropy_sum(logits, torch.rand(3, 3, 4), 0.1)


# ---------------------------------------------------------------- Sinkhorn-Knopp


def numpy_sinkhorn(logits, temp, n_iterations):
    """DINOv3's algorithm written out literally (float64): total-sum, then rows/K and columns/B alternately."""
    q = np.exp(np.asarray(logits, dtype=np.float64) / temp).T  # [K, B]
    n_prototypes, n_samples = q.shape
    q = q / q.sum()
    for _ in range(n_iterations):
        q = q / q.sum(axis=1, keepdims=True) / n_prototypes
        q = q / q.sum(axis=0, keepdims=True) / n_samples
    return (q * n_samples).T


@pytest.mark.parametrize("n_iterations", [1, 2, 3])
def test_sinkhorn_matches_literal_numpy_dinov3(n_iterations):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=gen)
    got = sinkhorn_knopp(logits, 0.5, n_iterations)
    expected = numpy_sinkhorn(logits.numpy(), 0.5, n_iterations)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-7)


def test_sinkhorn_marginals():
    gen = torch.Generator().manual_seed(1)
    n_samples, n_prototypes = 8, 4
    logits = torch.randn(n_samples, n_prototypes, generator=gen) * 2
    q = sinkhorn_knopp(logits, 0.7, 3)
    # Last step normalises samples: every row is a probability vector.
    torch.testing.assert_close(q.sum(dim=1), torch.ones(n_samples))
    assert (q >= 0).all()
    # Prototype marginals approach B/K: closer than the plain softmax after 3 iterations, ~exact after many.
    uniform = torch.full((n_prototypes,), n_samples / n_prototypes)
    softmax_error = (torch.softmax(logits / 0.7, dim=-1).sum(0) - uniform).abs().max()
    three_error = (q.sum(0) - uniform).abs().max()
    assert three_error < 0.5 * softmax_error
    torch.testing.assert_close(sinkhorn_knopp(logits, 0.7, 200).sum(0), uniform, rtol=1e-4, atol=1e-4)


def test_sinkhorn_large_logits_do_not_overflow_and_keep_input_intact():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(5, 7, generator=gen) * 8  # / 0.04 -> |x| up to ~600: exp overflows fp32
    before = logits.clone()
    got = sinkhorn_knopp(logits, 0.04, 3)
    assert torch.isfinite(got).all()
    np.testing.assert_allclose(got.numpy(), numpy_sinkhorn(logits.numpy(), 0.04, 3), rtol=1e-4, atol=1e-6)
    assert torch.equal(logits, before)


def test_sinkhorn_bf16_input_is_computed_in_fp32():
    logits = torch.randn(4, 6, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    got = sinkhorn_knopp(logits, 0.1)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), numpy_sinkhorn(logits.float().numpy(), 0.1, 3), rtol=1e-5, atol=1e-7)


def test_sinkhorn_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        sinkhorn_knopp(torch.zeros(3), 0.1)
    with pytest.raises(ValueError, match="teacher_temp"):
        sinkhorn_knopp(torch.zeros(2, 3), 0.0)


# ---------------------------------------------------------------- DINO


def dino_loop(student_global, student_local, teacher, temp=0.1):
    """Explicit pair loops: (global term over t != s, local term over all t, s), each a mean over its triples."""
    n_global, batch, _ = teacher.shape
    global_terms = [
        ce(teacher[t, b], student_global[s, b], temp)
        for t in range(n_global)
        for s in range(n_global)
        if s != t
        for b in range(batch)
    ]
    local_terms = [
        ce(teacher[t, b], student_local[s, b], temp)
        for t in range(n_global)
        for s in range(student_local.shape[0])
        for b in range(batch)
    ]
    return sum(global_terms) / len(global_terms), sum(local_terms) / len(local_terms), global_terms + local_terms


@pytest.mark.parametrize("n_global", [2, 3])
def test_dino_loss_equals_explicit_pair_loop(n_global):
    gen = torch.Generator().manual_seed(4)
    n_local, batch, k = 3, 2, 4
    student_global = torch.randn(n_global, batch, k, generator=gen, requires_grad=True)
    student_local = torch.randn(n_local, batch, k, generator=gen, requires_grad=True)
    teacher = torch.softmax(torch.randn(n_global, batch, k, generator=gen) * 3, dim=-1)

    global_loss, local_loss = DINOLoss(k)(student_global, student_local, teacher)
    ref_global, ref_local, all_terms = dino_loop(student_global, student_local, teacher)
    torch.testing.assert_close(global_loss.double(), ref_global, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(local_loss.double(), ref_local, rtol=1e-5, atol=1e-6)

    # The DINOv3 combination is the mean over all pairs, and so are its gradients.
    combined = combine_dino_terms(global_loss, local_loss, n_global, n_local)
    reference = sum(all_terms) / len(all_terms)
    torch.testing.assert_close(combined.double(), reference, rtol=1e-5, atol=1e-6)
    got_grads = torch.autograd.grad(combined, (student_global, student_local))
    ref_grads = torch.autograd.grad(reference, (student_global, student_local))
    for got, ref in zip(got_grads, ref_grads):
        torch.testing.assert_close(got.double(), ref.double(), rtol=1e-4, atol=1e-6)


def test_dino_global_term_removes_the_diagonal():
    # Student crop i predicts teacher crop i perfectly and crop j != i uniformly: the global term must see only
    # the mismatched pairs (CE with a uniform student = log K), never the matched ones.
    k = 4
    teacher = torch.eye(k)[[0, 1]].reshape(2, 1, k)  # crop 0 -> prototype 0, crop 1 -> prototype 1
    student = (teacher * 1000.0).clone()  # matches its own crop, far from the other's prototype
    global_loss, _ = DINOLoss(k)(student, None, teacher)
    # CE(teacher 1, student 0) = -log_softmax(student0 / 0.1)[1] = 1000 / 0.1 (+ log(1 + 3 e^-10000) ~ 0)
    torch.testing.assert_close(global_loss, torch.tensor(10000.0))


def test_dino_term_weights():
    assert dino_term_weights(2, 8) == pytest.approx((2 / 18, 16 / 18))
    assert dino_term_weights(2, 0) == (1.0, 0.0)
    assert dino_term_weights(1, 4) == (0.0, 1.0)
    assert combine_dino_terms(torch.tensor(9.0), torch.tensor(18.0)).item() == pytest.approx(2 / 18 * 9 + 16 / 18 * 18)
    with pytest.raises(ValueError, match="no teacher/student pair"):
        dino_term_weights(1, 0)


def test_dino_loss_rejects_mismatched_shapes():
    loss = DINOLoss(4)
    with pytest.raises(ValueError, match="student_local has batch 3"):
        loss(torch.zeros(2, 2, 4), torch.zeros(8, 3, 4), torch.full((2, 2, 4), 0.25))
    with pytest.raises(ValueError, match=r"\[n_crops, B, 4\]"):
        loss(torch.zeros(2, 2, 5), None, torch.full((2, 2, 4), 0.25))


# ---------------------------------------------------------------- iBOT


def test_ibot_weights_and_loss_against_direct_loop():
    gen = torch.Generator().manual_seed(5)
    k = 5
    masks = torch.zeros(3, 6, dtype=torch.bool)
    masks[0, [1]] = True  # 1 masked patch
    masks[1, [0, 2, 5]] = True  # 3 masked patches; image 2 unmasked but still counted in n_images
    weights = masked_patch_weights(masks)
    torch.testing.assert_close(weights, torch.tensor([1.0, 1 / 3, 1 / 3, 1 / 3]))

    student = torch.randn(4, k, generator=gen, requires_grad=True)
    teacher = torch.softmax(torch.randn(4, k, generator=gen), dim=-1)
    got = iBOTPatchLoss(k)(student, teacher, weights, n_images=3)
    per_image = [ce(teacher[0], student[0]), sum(ce(teacher[m], student[m]) for m in (1, 2, 3)) / 3]
    expected = sum(per_image) / 3
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        torch.autograd.grad(got, student)[0].double(),
        torch.autograd.grad(expected, student)[0].double(),
        rtol=1e-4,
        atol=1e-6,
    )


def test_ibot_hand_value_with_uniform_student():
    # A uniform student has CE = log K against any target; 2 masked images of 4 -> 2 * log K / 4.
    masks = torch.tensor([[1, 1, 0], [0, 0, 0], [0, 1, 0], [0, 0, 0]], dtype=torch.bool)
    teacher = torch.softmax(torch.randn(3, 8), dim=-1)
    got = iBOTPatchLoss(8)(torch.zeros(3, 8), teacher, masked_patch_weights(masks), n_images=4)
    assert got.item() == pytest.approx(2 * math.log(8) / 4, rel=1e-6)


def test_ibot_rejects_inconsistent_counts():
    with pytest.raises(ValueError, match="masked patch counts differ"):
        iBOTPatchLoss(4)(torch.zeros(3, 4), torch.zeros(3, 4), torch.ones(2), n_images=2)


# ---------------------------------------------------------------- KoLeo


def test_koleo_hand_placed_points():
    degrees = torch.tensor([0.0, 30.0, 120.0, 225.0])
    radians = torch.deg2rad(degrees)
    lengths = torch.tensor([1.0, 2.0, 0.5, 3.0])  # normalisation must remove these
    points = torch.stack([torch.cos(radians), torch.sin(radians)], dim=1) * lengths[:, None]
    # Nearest neighbours by angle: 0<->30 (30 deg), 120->30 (90 deg), 225->120 (105 deg). Chord = 2 sin(angle/2).
    chords = [2 * math.sin(math.radians(a) / 2) for a in (30, 30, 90, 105)]
    expected = -sum(math.log(c + 1e-8) for c in chords) / 4
    assert KoLeoLoss()(points).item() == pytest.approx(expected, rel=1e-5)
    # Per-crop sum over [n_crops, B, D].
    two_crops = torch.stack([points, points * 2])
    assert KoLeoLoss()(two_crops).item() == pytest.approx(2 * expected, rel=1e-5)


def test_koleo_duplicates_give_finite_gradients():
    points = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    loss = KoLeoLoss()(points)
    (grad,) = torch.autograd.grad(loss, points)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_koleo_needs_two_samples():
    with pytest.raises(ValueError, match="at least 2 samples"):
        KoLeoLoss()(torch.ones(1, 3))


def test_total_loss_weights():
    assert total_loss(torch.tensor(2.0), torch.tensor(3.0), torch.tensor(10.0)).item() == pytest.approx(6.0)
    assert total_loss(torch.tensor(2.0), torch.tensor(3.0), torch.tensor(10.0), (0.5, 0.0, 1.0)).item() == 11.0


# ---------------------------------------------------------------- distributed Sinkhorn (2 gloo processes)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Unequal row counts per rank, as for masked patches; the second case leaves rank 1 with no rows at all.
SHARDS = [(2, 5), (4, 0)]


def _shard_logits(case: int) -> torch.Tensor:
    rows = sum(SHARDS[case])
    return torch.randn(rows, 6, generator=torch.Generator().manual_seed(10 + case)) * 4


def _distributed_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        for case, sizes in enumerate(SHARDS):
            start = sum(sizes[:rank])
            local = _shard_logits(case)[start : start + sizes[rank]]
            torch.save(sinkhorn_knopp(local, 0.1, 3), os.path.join(out_dir, f"case{case}_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(60)
def test_distributed_sinkhorn_equals_single_process_on_concatenated_batch():
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_distributed_worker, args=(2, _free_port(), out_dir), nprocs=2, join=True)
        for case in range(len(SHARDS)):
            parts = [torch.load(os.path.join(out_dir, f"case{case}_rank{rank}.pt")) for rank in range(2)]
            assert [p.shape[0] for p in parts] == list(SHARDS[case])
            single = sinkhorn_knopp(_shard_logits(case), 0.1, 3)
            torch.testing.assert_close(torch.cat(parts), single, rtol=1e-5, atol=1e-7)
            # And it is not the per-rank result: the marginals really were shared.
            if SHARDS[case][1] > 0:
                assert not torch.allclose(parts[0], sinkhorn_knopp(_shard_logits(case)[: SHARDS[case][0]], 0.1, 3))


# ---------------------------------------------------------------- torch.compile


def test_losses_trace_as_one_graph_under_torch_compile():
    # The training step may be compiled: the whole objective (incl. the chunked CE's autograd.Function) must trace
    # without graph breaks. aot_eager checks tracing and autograd without needing a C++ compiler here.
    gen = torch.Generator().manual_seed(6)

    def objective(student_global, student_local, teacher_logits, student_patches, teacher_patches, weights, features):
        teacher = sinkhorn_knopp(teacher_logits.flatten(0, 1), 0.07).unflatten(0, (2, teacher_logits.shape[1]))
        dino = combine_dino_terms(*DINOLoss(16)(student_global, student_local, teacher), 2, 3)
        ibot = iBOTPatchLoss(16)(student_patches, sinkhorn_knopp(teacher_patches, 0.07), weights, 4)
        return total_loss(dino, ibot, KoLeoLoss()(features))

    inputs = [
        torch.randn(2, 3, 16, generator=gen, requires_grad=True),
        torch.randn(3, 3, 16, generator=gen, requires_grad=True),
        torch.randn(2, 3, 16, generator=gen),
        torch.randn(5, 16, generator=gen, requires_grad=True),
        torch.randn(5, 16, generator=gen),
        torch.rand(5, generator=gen),
        torch.randn(2, 3, 8, generator=gen, requires_grad=True),
    ]
    eager = objective(*inputs)
    eager_grads = torch.autograd.grad(eager, [x for x in inputs if x.requires_grad])
    compiled = torch.compile(objective, backend="aot_eager", fullgraph=True)(*inputs)
    compiled_grads = torch.autograd.grad(compiled, [x for x in inputs if x.requires_grad])
    torch.testing.assert_close(compiled, eager)
    for got, ref in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, ref)
