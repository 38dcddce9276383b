"""gather_project: weight @ (table[index] * scale + shift) + bias, 0 for empty slots."""

import pytest
import torch

from giblet import ops
from giblet import ops_reference as ref

# Absolute/relative tolerances of the fused result against the reference, by weight dtype.
TOLERANCE = {torch.float32: (2e-4, 1e-4), torch.bfloat16: (5e-2, 2e-2), torch.float16: (1e-2, 5e-3)}


def make_index(batch, slots, rows, device, empty_fraction=0.2, repeats=True):
    """Window indices with empty slots (-1) and rows named by several slots."""
    pool = rows if not repeats else max(2, rows // 3)
    index = torch.randint(0, pool, (batch, slots), device=device)
    index[torch.rand(batch, slots, device=device) < empty_fraction] = -1
    return index


def make_table(rows, dim, dtype, device):
    if dtype == torch.uint8:
        return torch.randint(0, 256, (rows, dim), dtype=torch.uint8, device=device)
    return torch.randn(rows, dim, device=device).to(dtype)


def run_both(table, index, weight, bias, scale, shift, grad_table=False):
    """Forward and backward of the fused op and of the reference on identical leaves."""
    results = []
    for fn in (ops.gather_project, ref.gather_project):
        t = table.detach().clone().requires_grad_(grad_table)
        w = weight.detach().clone().requires_grad_(True)
        b = None if bias is None else bias.detach().clone().requires_grad_(True)
        out = fn(t, index, w, b, scale, shift)
        grad_out = torch.linspace(-1, 1, out.numel(), device=out.device).reshape(out.shape).to(out.dtype)
        leaves = [w] + ([b] if b is not None else []) + ([t] if grad_table else [])
        grads = torch.autograd.grad(out, leaves, grad_out)
        results.append((out, grads))
    return results


@pytest.mark.parametrize("table_dtype", [torch.uint8, torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_reference_forward_and_backward(device, table_dtype, weight_dtype):
    table = make_table(40, 96, table_dtype, device)
    index = make_index(3, 7, 40, device)
    weight = (torch.randn(11, 96, device=device) * 0.1).to(weight_dtype)
    bias = torch.randn(11, device=device).to(weight_dtype)
    scale, shift = (1 / 255, -0.5) if table_dtype == torch.uint8 else (0.7, 0.1)
    grad_table = table_dtype.is_floating_point
    (out, grads), (ref_out, ref_grads) = run_both(table, index, weight, bias, scale, shift, grad_table)
    atol, rtol = TOLERANCE[weight_dtype]
    assert out.dtype == weight_dtype and out.shape == (3, 7, 11)
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=rtol)
    # The table gradient is stored in the table's dtype: its rounding counts too.
    table_atol, table_rtol = TOLERANCE.get(table_dtype, (0, 0))
    atol, rtol = max(atol, table_atol), max(rtol, table_rtol)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got.float(), want.float(), atol=atol * 10, rtol=rtol * 10)


def test_empty_slots_are_exactly_zero_and_pass_no_gradient(device):
    table = make_table(20, 32, torch.uint8, device)
    index = torch.full((2, 5), -1, dtype=torch.int64, device=device)
    index[0, 1] = 3
    weight = torch.randn(6, 32, device=device, requires_grad=True)
    bias = torch.randn(6, device=device, requires_grad=True)
    out = ops.gather_project(table, index, weight, bias, scale=2.0, shift=5.0)
    empty = index < 0
    assert torch.equal(out[empty], torch.zeros_like(out[empty]))
    assert out[0, 1].abs().sum() > 0
    # A gradient that lands only on empty slots reaches no parameter.
    grad_out = torch.where(empty.unsqueeze(-1), torch.ones_like(out), torch.zeros_like(out))
    grad_weight, grad_bias = torch.autograd.grad(out, (weight, bias), grad_out)
    assert torch.equal(grad_weight, torch.zeros_like(grad_weight))
    assert torch.equal(grad_bias, torch.zeros_like(grad_bias))


def test_all_slots_empty(device):
    table = make_table(5, 8, torch.float32, device)
    index = torch.full((3, 4), -1, dtype=torch.int64, device=device)
    weight = torch.randn(2, 8, device=device, requires_grad=True)
    out = ops.gather_project(table, index, weight)
    assert torch.equal(out, torch.zeros(3, 4, 2, device=device))
    (grad_weight,) = torch.autograd.grad(out.sum(), (weight,))
    assert torch.equal(grad_weight, torch.zeros_like(grad_weight))


def test_repeated_rows_scatter_add_into_the_table_gradient(device):
    table = torch.randn(6, 16, device=device, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 16, device=device, dtype=torch.float64)
    index = torch.tensor([[2, 2, 2], [2, -1, 5]], device=device)
    out = ops.gather_project(table, index, weight, scale=3.0)
    (grad_table,) = torch.autograd.grad(out.sum(), (table,))
    # Row 2 is named by four slots, row 5 by one, the rest by none.
    torch.testing.assert_close(grad_table[2], 4 * 3.0 * weight.sum(0))
    torch.testing.assert_close(grad_table[5], 3.0 * weight.sum(0))
    assert torch.equal(grad_table[[0, 1, 3, 4]], torch.zeros(4, 16, dtype=torch.float64, device=device))


def test_non_contiguous_inputs(device):
    table = torch.randn(50, 64, device=device).t()  # (64, 50), column-major
    index = make_index(4, 12, 64, device)[:, ::2]  # strided
    weight = torch.randn(50, 9, device=device).t()  # (9, 50), transposed
    bias = torch.randn(18, device=device)[::2]
    assert not (table.is_contiguous() or index.is_contiguous() or weight.is_contiguous() or bias.is_contiguous())
    (out, grads), (ref_out, ref_grads) = run_both(table, index, weight, bias, 1.0, 0.0, grad_table=True)
    torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_many_column_blocks(device):
    # 700 unique rows x 3,000 columns exceeds one CPU block (512 K elements), so
    # the projection runs over several column blocks, the last one partial.
    table = make_table(900, 3000, torch.uint8, device)
    index = torch.randperm(900, device=device)[:700].reshape(35, 20)
    weight = torch.randn(16, 3000, device=device) * 0.01
    (out, grads), (ref_out, ref_grads) = run_both(table, index, weight, None, 1 / 255, 0.0)
    torch.testing.assert_close(out, ref_out, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(grads[0], ref_grads[0], atol=2e-3, rtol=1e-4)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_column_blocks_shared_between_threads_match_the_reference(threads):
    # On the CPU the column blocks are shared out between threads in one parallel region, each
    # thread summing its own partial projection; every thread count gives the reference's result,
    # including the table's gradient (each block writes its own columns).
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        table = make_table(600, 4000, torch.float32, "cpu")
        index = make_index(40, 24, 600, "cpu")
        weight = torch.randn(12, 4000) * 0.01
        bias = torch.randn(12)
        (out, grads), (ref_out, ref_grads) = run_both(table, index, weight, bias, 0.5, -0.25, grad_table=True)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(out, ref_out, atol=2e-4, rtol=1e-4)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-4)


def test_gradcheck_float64(device):
    table = torch.randn(9, 7, dtype=torch.float64, device=device, requires_grad=True)
    weight = torch.randn(5, 7, dtype=torch.float64, device=device, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, device=device, requires_grad=True)
    index = torch.tensor([[0, 3, -1, 3], [8, 8, 1, -1]], device=device)
    assert torch.autograd.gradcheck(
        lambda t, w, b: ops.gather_project(t, index, w, b, scale=0.5, shift=0.25), (table, weight, bias)
    )


# --------------------------------------------------------------------------- bad input


def inputs(device="cpu"):
    return (
        torch.zeros(10, 4, dtype=torch.uint8, device=device),
        torch.zeros(2, 3, dtype=torch.int64, device=device),
        torch.zeros(5, 4, device=device),
    )


def test_index_out_of_range_names_the_index_and_T():
    table, index, weight = inputs()
    index[1, 2] = 10
    with pytest.raises(RuntimeError, match=r"index holds 10 at position \(1, 2\) but table has T=10 rows"):
        ops.gather_project(table, index, weight)


def test_index_below_minus_one_is_rejected():
    table, index, weight = inputs()
    index[0, 0] = -3
    with pytest.raises(RuntimeError, match=r"index holds -3 at position \(0, 0\).*expected -1 \(empty slot\) or 0..9"):
        ops.gather_project(table, index, weight)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t, i, w: (t[None], i, w), r"table must be 2-D \(T, D\), got shape \[1, 10, 4\]"),
        (lambda t, i, w: (t.int(), i, w), r"table must be uint8, float16, bfloat16, float32 or float64, got Int"),
        (lambda t, i, w: (t, i.int(), w), r"index must be int64, got Int"),
        (lambda t, i, w: (t, i[0], w), r"index must be 2-D \(B, S\) of row numbers, got shape \[3\]"),
        (lambda t, i, w: (t, i, w[:, :3]), r"weight has shape \[5, 3\] but table has D=4 columns; expected weight \(P, 4\)"),
        (lambda t, i, w: (t, i, w.long()), r"weight must be float32, float64, float16 or bfloat16, got Long"),
    ],
)
def test_bad_input_messages(change, message):
    table, index, weight = change(*inputs())
    with pytest.raises(RuntimeError, match=message):
        ops.gather_project(table, index, weight)


def test_bad_bias_message():
    table, index, weight = inputs()
    with pytest.raises(RuntimeError, match=r"bias has shape \[4\]; expected \(5,\) to match weight \(P, D\)"):
        ops.gather_project(table, index, weight, torch.zeros(4))
    with pytest.raises(RuntimeError, match=r"bias has dtype Half but weight has dtype Float"):
        ops.gather_project(table, index, weight, torch.zeros(5, dtype=torch.float16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA test skipped: no CUDA GPU on this machine")
def test_device_mismatch_message():
    table, index, weight = inputs()
    with pytest.raises(RuntimeError, match=r"weight is on cuda:0 but table is on cpu"):
        ops.gather_project(table, index, weight.cuda())


MATERIALIZE_PROBE = """
import json, torch
from giblet import ops, ops_reference as ref
from giblet.bench.ops import peak_extra_in_process
from giblet.bench.train_step import num_threads

table = torch.randint(0, 256, (4096, 8192), dtype=torch.uint8)
index = torch.randperm(4096)[:4096].reshape(64, 64)
weight = torch.randn(32, 8192, requires_grad=True)

def fused():
    out = ops.gather_project(table, index, weight, scale=1 / 255)
    return [out, *torch.autograd.grad(out, (weight,), torch.ones_like(out))]

def reference():
    out = ref.gather_project(table, index, weight, scale=1 / 255)
    return [out, *torch.autograd.grad(out, (weight,), torch.ones_like(out))]

with num_threads(2):
    print(json.dumps({"reference": peak_extra_in_process(reference, torch.device("cpu")),
                      "fused": peak_extra_in_process(fused, torch.device("cpu"))}))
"""


def test_never_materializes_the_gathered_input():
    # 64 windows x 64 slots x 8,192 columns: the gathered float input would be
    # 128 MiB. The fused forward + backward works in 2 MB blocks, one per thread
    # (about 3 MB each with the partial sums: 47 MiB at 16 threads), so the
    # measurement is made at 2 threads, whatever the machine has. It runs in a fresh
    # process with large blocks mapped and unmapped by malloc (as `giblet bench`
    # measures), so memory that earlier tests freed but the heap kept cannot hide
    # part of a materialized input from the resident-set peak.
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    done = subprocess.run([sys.executable, "-c", MATERIALIZE_PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    peaks = json.loads(done.stdout.strip().splitlines()[-1])
    gathered_bytes = 64 * 64 * 8192 * 4
    assert peaks["reference"] >= gathered_bytes  # the measurement sees a materialized input
    assert peaks["fused"] < gathered_bytes / 8


# --------------------------------------------------------------------------- the plan: made once by the forward pass


def test_forward_returns_its_plan(device):
    # The op returns (out, rows, slot_to_row): the sorted unique rows named, and 1 + each slot's
    # position in them (0 for an empty slot); ops.gather_project returns the projection alone.
    table = make_table(9, 6, torch.float32, device)
    index = torch.tensor([[4, 4, -1, 7], [0, 7, 4, -1]], device=device)
    weight = torch.randn(3, 6, device=device)
    out, rows, slot_to_row = torch.ops.giblet.gather_project(table, index, weight, None, 1.0, 0.0)
    assert torch.equal(rows, torch.tensor([0, 4, 7], device=device))
    assert torch.equal(slot_to_row, torch.tensor([[2, 2, 0, 3], [1, 3, 2, 0]], device=device))
    assert rows.storage_offset() == 0 and slot_to_row.shape == index.shape
    assert torch.equal(out, ops.gather_project(table, index, weight))


def test_backward_uses_the_forward_plan_without_planning_again():
    # Planning (a sort of the index) runs once per forward; the backward pass only reads the plan.
    table = make_table(30, 16, torch.uint8, "cpu")
    index = make_index(4, 9, 30, "cpu")
    weight = torch.randn(5, 16, requires_grad=True)

    def ops_called(fn):
        with torch.profiler.profile() as profile:
            fn()
        return [event.name for event in profile.events()]

    holder = {}

    def forward():
        holder["out"] = ops.gather_project(table, index, weight, scale=1 / 255)

    def backward():
        torch.autograd.grad(holder["out"], (weight,), torch.ones_like(holder["out"]))

    forward_ops, backward_ops = ops_called(forward), ops_called(backward)
    assert forward_ops.count("aten::sort") == 1, forward_ops
    assert "giblet::gather_project_backward" in backward_ops
    assert not {"aten::sort", "aten::_unique2", "aten::unique_dim", "aten::cumsum"} & set(backward_ops), backward_ops


@pytest.mark.parametrize("shape", [(0, 4), (3, 0)])
def test_empty_index(device, shape):
    table = make_table(6, 8, torch.float32, device)
    index = torch.empty(shape, dtype=torch.int64, device=device)
    weight = torch.randn(2, 8, device=device, requires_grad=True)
    bias = torch.randn(2, device=device, requires_grad=True)
    out = ops.gather_project(table, index, weight, bias)
    assert out.shape == (*shape, 2)
    grad_weight, grad_bias = torch.autograd.grad(out.sum(), (weight, bias))
    assert torch.equal(grad_weight, torch.zeros_like(grad_weight)) and torch.equal(grad_bias, torch.zeros_like(grad_bias))


def test_meta_tensors_give_the_shapes():
    # Under torch.device("meta") (model summaries) the fake kernel runs as the meta kernel: no data,
    # so the plan's row count takes its upper bound, one row per slot.
    with torch.device("meta"):
        table = torch.empty(10, 4, dtype=torch.uint8)
        index = torch.empty(3, 5, dtype=torch.int64)
        weight = torch.empty(6, 4, requires_grad=True)
    out, rows, slot_to_row = torch.ops.giblet.gather_project(table, index, weight, None, 1.0, 0.0)
    assert out.device.type == "meta" and out.shape == (3, 5, 6)
    assert rows.shape == (15,) and slot_to_row.shape == (3, 5)
    (grad_weight,) = torch.autograd.grad(ops.gather_project(table, index, weight).sum(), (weight,))
    assert grad_weight.device.type == "meta" and grad_weight.shape == (6, 4)


def test_backward_with_the_plan_matches_the_reference(device):
    # The backward op called directly with the forward's plan, against autograd through the reference.
    table = make_table(50, 40, torch.float64, device)
    index = make_index(6, 11, 50, device)
    weight = torch.randn(7, 40, dtype=torch.float64, device=device)
    _, rows, slot_to_row = torch.ops.giblet.gather_project(table, index, weight, None, 0.5, 0.25)
    grad_out = torch.randn(6, 11, 7, dtype=torch.float64, device=device)
    grad_table, grad_weight, grad_bias = torch.ops.giblet.gather_project_backward(
        grad_out, table, rows, slot_to_row, weight, 0.5, 0.25, True
    )
    leaves = [table.clone().requires_grad_(True), weight.clone().requires_grad_(True), torch.zeros(7, dtype=torch.float64, device=device, requires_grad=True)]
    want = torch.autograd.grad(ref.gather_project(leaves[0], index, leaves[1], leaves[2], 0.5, 0.25), leaves, grad_out)
    for got, expected in zip((grad_table, grad_weight, grad_bias), want):
        torch.testing.assert_close(got, expected)


def test_several_bad_indices_name_the_lowest_below_minus_one():
    table, index, weight = inputs()
    index[0, 2], index[1, 0], index[1, 1] = 12, -5, -3
    with pytest.raises(RuntimeError, match=r"index holds -5 at position \(1, 0\) but table has T=10 rows"):
        ops.gather_project(table, index, weight)
    index[1, 0], index[1, 1] = -1, 11
    with pytest.raises(RuntimeError, match=r"index holds 12 at position \(0, 2\) but table has T=10 rows"):
        ops.gather_project(table, index, weight)


def test_backward_rejects_a_plan_that_is_not_the_forward_one():
    table, _, weight = inputs()
    grad_out = torch.zeros(1, 2, 5)
    backward = torch.ops.giblet.gather_project_backward
    with pytest.raises(RuntimeError, match=r"gather_project_backward: rows holds 10 but table has T=10 rows"):
        backward(grad_out, table, torch.tensor([3, 10]), torch.tensor([[1, 2]]), weight, 1.0, 0.0, False)
    with pytest.raises(RuntimeError, match=r"gather_project_backward: slot_to_row holds 3 but rows has U=2 entries"):
        backward(grad_out, table, torch.tensor([3, 4]), torch.tensor([[3, 0]]), weight, 1.0, 0.0, False)
    with pytest.raises(RuntimeError, match=r"gather_project_backward: grad_out has shape \[2, 1, 5\]; expected \(1, 2, 5\)"):
        backward(grad_out.view(2, 1, 5), table, torch.tensor([3, 4]), torch.tensor([[1, 2]]), weight, 1.0, 0.0, False)
    with pytest.raises(RuntimeError, match=r"rows and slot_to_row must be int64, got Int and Long"):
        backward(grad_out, table, torch.tensor([3, 4], dtype=torch.int32), torch.tensor([[1, 2]]), weight, 1.0, 0.0, False)


# --------------------------------------------------------------------------- CUDA: the vectorised uint8 gather

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA test skipped: no CUDA GPU on this machine")


def scalar_path_copy(table):
    """The same values with column stride T: the CUDA gather then reads one byte per thread."""
    copy = table.t().contiguous().t()
    assert copy.stride(1) != 1 and torch.equal(copy, table)
    return copy


def uint8_view(rows, dim, row_stride, offset, device):
    """A (rows, dim) uint8 table at `offset` bytes into its storage, rows `row_stride` bytes apart."""
    storage = torch.randint(0, 256, (offset + rows * row_stride,), dtype=torch.uint8, device=device)
    return storage.as_strided((rows, dim), (row_stride, 1), offset)


@cuda_only
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "dim, row_stride, offset",
    [
        (64, 64, 0),  # 16 bytes per thread
        (96, 96, 16),
        (100, 100, 0),  # 4 bytes per thread, 100 = 6 x 16 + 4
        (61, 64, 0),  # 16-byte rows, 61 columns: vector part + scalar tail, unaligned output rows
        (61, 61, 0),  # odd row stride: scalar path
        (64, 64, 3),  # misaligned start: scalar path
        (64, 68, 4),  # 4-byte aligned only
        (1000, 1000, 8),  # 8-byte aligned start: 4 bytes per thread
        (1037, 1040, 32),
    ],
)
def test_vectorised_uint8_gather_is_bit_identical(weight_dtype, dim, row_stride, offset):
    assert not torch.backends.cuda.matmul.allow_tf32  # the identity projection below must be exact
    table = uint8_view(300, dim, row_stride, offset, "cuda")
    index = make_index(7, 13, 300, "cuda")
    scale, shift = 1 / 255, -0.5
    # An identity projection gives the dequantized rows themselves, exactly: each output is one
    # product by 1 plus products by 0.
    eye = torch.eye(dim, dtype=weight_dtype, device="cuda")
    out = ops.gather_project(table, index, eye, scale=scale, shift=shift)
    rows = table[index.clamp(min=0)].to(weight_dtype) * scale + shift
    expected = torch.where((index >= 0).unsqueeze(-1), rows, torch.zeros((), dtype=weight_dtype, device="cuda"))
    assert torch.equal(out, expected)
    assert torch.equal(out, ops.gather_project(scalar_path_copy(table), index, eye, scale=scale, shift=shift))


@cuda_only
@pytest.mark.parametrize("dim", [20016, 20004, 20001])
def test_vectorised_uint8_gather_over_several_column_blocks(dim):
    # 2,000 unique rows x ~20,000 columns: two column blocks of the CUDA buffer (32 M elements),
    # the second starting at column 16,768. Forward and gradients are bit-identical to the
    # one-byte-per-thread path on the same values.
    table = torch.randint(0, 256, (2500, dim), dtype=torch.uint8, device="cuda")
    index = torch.randperm(2500, device="cuda")[:2000].reshape(40, 50)
    index[0, :5] = -1
    weight = (torch.randn(8, dim, device="cuda") * 0.01).requires_grad_(True)
    bias = torch.randn(8, device="cuda", requires_grad=True)
    results = []
    for t in (table, scalar_path_copy(table)):
        out = ops.gather_project(t, index, weight, bias, scale=1 / 255, shift=0.1)
        results.append((out, *torch.autograd.grad(out, (weight, bias), torch.ones_like(out))))
    for vectorised, scalar in zip(*results):
        assert torch.equal(vectorised, scalar)


@cuda_only
def test_forward_syncs_once_and_backward_never():
    # The host waits for the device once per forward (the index's ends and U, in one copy) and
    # never in the backward pass: counted as the CUDA runtime's synchronizing calls in a profile.
    from torch.profiler import ProfilerActivity, profile

    table = torch.randint(0, 256, (500, 4096), dtype=torch.uint8, device="cuda")
    index = make_index(16, 48, 500, "cuda")
    weight = torch.randn(64, 4096, device="cuda", requires_grad=True)
    bias = torch.zeros(64, device="cuda", requires_grad=True)
    grad_out = torch.randn(16, 48, 64, device="cuda")
    ops.gather_project(table, index, weight, bias, scale=1 / 255)  # warm-up: allocator, cuBLAS handles
    torch.cuda.synchronize()

    def syncs(fn):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiled:
            result = fn()
        # (Not cudaDeviceSynchronize: the profiler calls it itself when it starts and stops.)
        waits = {"cudaStreamSynchronize", "cudaEventSynchronize", "cudaMemcpy"}
        return result, sum(event.name in waits for event in profiled.events())

    out, forward_syncs = syncs(lambda: ops.gather_project(table, index, weight, bias, scale=1 / 255))
    _, backward_syncs = syncs(lambda: torch.autograd.grad(out, (weight, bias), grad_out))
    assert forward_syncs == 1
    assert backward_syncs == 0
    # The same through torch's sync debug mode, which raises at a synchronizing call.
    out = ops.gather_project(table, index, weight, bias, scale=1 / 255)
    torch.cuda.set_sync_debug_mode("error")
    try:
        torch.autograd.grad(out, (weight, bias), grad_out)
    finally:
        torch.cuda.set_sync_debug_mode("default")
