"""The native CPU kernels (worker/csrc/cpu_kernels.cpp) equal float64 arithmetic, and every kernel gives the same
model."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from worker import cpu_kernels
from worker.linear import ONEDNN_FROM_ROWS, Linear, _onednn_ok, choose_kernel, dual_helps
from worker.model import RWKV5, logits_scale, wkv_step

CAN_BUILD = not cpu_kernels.missing_prerequisite()
native = pytest.mark.skipif(not CAN_BUILD, reason="needs an AVX2/FMA/F16C CPU and a C++ compiler")
# oneDNN's bf16 linear needs AVX512BW/VL/DQ or AVX-NE-CONVERT: on an AVX2-only CPU there is no dual bf16 kernel
onednn_bf16 = pytest.mark.skipif(not _onednn_ok(torch.bfloat16), reason="oneDNN has no bf16 linear on this CPU")
DUAL_DTYPES = [torch.float32, pytest.param(torch.bfloat16, marks=onednn_bf16)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _kernels_loaded() -> None:
    """Tests that call an op directly find it loaded however they are selected (building a model loads it too)."""
    if CAN_BUILD:
        assert cpu_kernels.available(), cpu_kernels.why_unavailable()


@native
def test_native_kernels_build_here():
    # A machine that can build them must not fall back silently (that would halve decode speed unnoticed).
    assert cpu_kernels.available(), cpu_kernels.why_unavailable()


@native
@settings(max_examples=60, deadline=None)
@given(out_features=st.integers(1, 80), in_features=st.integers(1, 300), rows=st.integers(1, 40),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_native_linear_equals_float64(out_features, in_features, rows, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g).to(dtype)
    x = torch.randn(rows, in_features, generator=g)
    y = cpu_kernels.linear(x, cpu_kernels.pack(w), out_features)
    exact = x.double() @ w.double().T  # the weights as stored (already rounded to dtype), exact arithmetic
    assert y.shape == (rows, out_features) and y.dtype == torch.float32
    # fp32 accumulation over <= 300 products: relative error ~1e-6 of the sum of |terms|
    bound = 1e-5 * (x.double().abs() @ w.double().abs().T).max().item() + 1e-30
    assert (y.double() - exact).abs().max().item() <= bound


@native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_native_linear_model_shapes(dtype):
    # Shapes of a real layer, 1 row (decode at B=1), 6 (one microkernel tile), 32 (several tiles and the widened path)
    g = torch.Generator().manual_seed(1)
    for out_features, in_features in ((768, 768), (2688, 768), (768, 2688), (4099, 64)):
        w = torch.randn(out_features, in_features, generator=g).to(dtype)
        packed = cpu_kernels.pack(w)
        for rows in (1, 6, 32):
            x = torch.randn(rows, in_features, generator=g)
            ref = F.linear(x.double(), w.double())
            err = (cpu_kernels.linear(x, packed, out_features).double() - ref).abs().max().item()
            assert err <= 1e-5 * ref.abs().max().item()


@native
def test_native_linear_rejects_bad_arguments():
    packed = cpu_kernels.pack(torch.randn(32, 8))
    with pytest.raises(RuntimeError, match="features"):
        cpu_kernels.linear(torch.randn(2, 9), packed, 32)
    with pytest.raises(RuntimeError, match="panels"):
        cpu_kernels.linear(torch.randn(2, 8), packed, 33)
    with pytest.raises(RuntimeError, match="fp32"):
        cpu_kernels.linear(torch.randn(2, 8).double(), packed, 32)


@native
@pytest.mark.parametrize("batch,heads,size", [(1, 12, 64), (5, 3, 64), (2, 2, 8), (3, 1, 1)])
@pytest.mark.parametrize("in_place", [False, True])
def test_native_wkv_step_equals_torch(batch, heads, size, in_place):
    g = torch.Generator().manual_seed(batch * 100 + size)
    r, k, v = (torch.randn(batch, heads, size, generator=g) for _ in range(3))
    w, u = torch.rand(heads, size, generator=g), torch.randn(heads, size, generator=g)
    s = torch.randn(batch, heads, size, size, generator=g)
    y_ref, s_ref = wkv_step(r, k, v, w, u, s.clone())
    out = s.clone() if in_place else torch.full_like(s, float("nan"))
    y, s_new = cpu_kernels.wkv_step(r, k, v, w, u, out if in_place else s, out), out
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_new, s_ref, rtol=1e-5, atol=1e-5)


def test_unknown_kernel_is_refused():
    with pytest.raises(ValueError, match="unknown kernel"):
        choose_kernel(torch.randn(4, 4), "mkl")


def test_torch_kernel_for_tensors_no_cpu_kernel_takes():
    assert choose_kernel(torch.randn(4, 4).double(), "auto") == "torch"
    assert choose_kernel(torch.randn(4, 4), "torch") == "torch"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_every_kernel_gives_the_same_model(tiny_checkpoint, dtype):
    """The same checkpoint through native, oneDNN (where it takes the dtype) and F.linear: same logits, same state."""
    tokens = torch.randint(0, 65536, (3, 9), generator=torch.Generator().manual_seed(3))
    results = {}
    for kernel in ("native", "onednn", "dual", "torch"):
        if kernel in ("native", "dual") and not CAN_BUILD or kernel == "dual" and not _onednn_ok(dtype):
            continue
        model = RWKV5.from_checkpoint(tiny_checkpoint, dtype=dtype, kernel=kernel)
        logits, state = model.forward(tokens, model.init_state(3))
        step, _ = model.forward(tokens[:, :1], state)  # and one decode step after the prefill
        results[model.kernel] = (logits, step, state.wkv)
    ref_logits, ref_step, ref_wkv = results["torch"]
    # bf16 paths round activations differently (oneDNN/F.linear round x to bf16, native keeps it fp32)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for name, (logits, step, wkv) in results.items():
        assert (logits - ref_logits).abs().max().item() <= tol * logits_scale(ref_logits), name
        assert (step - ref_step).abs().max().item() <= tol * logits_scale(ref_step), name
        assert (wkv - ref_wkv).abs().max().item() <= tol * max(ref_wkv.abs().max().item(), 1e-6), name
    if CAN_BUILD:
        assert "native" in results


@native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_native_block_equals_torch_path(tmp_path, dtype):
    """The native block (one C++ call per block, any T) against the readable torch path over the same native matmul:
    prefill chunks of several lengths, then decode steps, sessions at different positions. 7 layers, so that fp16's
    residual rescaling (2^(layer // 6)) is exercised."""
    from worker.checkpoint import make_random_checkpoint

    ck = make_random_checkpoint(tmp_path / "L7-D64.pth", 7, 64, seed=7)
    native_model = RWKV5.from_checkpoint(ck, dtype=dtype, kernel="native")
    torch_model = RWKV5.from_checkpoint(ck, dtype=dtype, kernel="native")
    torch_model._native_blocks = None  # the Python block (torch elementwise ops), same weights and matmul
    assert native_model._native_blocks is not None
    tol = 1e-5
    g = torch.Generator().manual_seed(11)
    state_n, state_t = native_model.init_state(3), torch_model.init_state(3)
    # B=3 with different histories: each row of the batch carries its own state; T=1 is a decode step, T=64 spans
    # more than one of the torch path's WKV chunks
    for step, (batch, length) in enumerate([(3, 17), (3, 1), (3, 64), (3, 2), (3, 1), (3, 1)]):
        tokens = torch.randint(0, 65536, (batch, length), generator=g)
        logits_n, state_n = native_model.forward(tokens, state_n, all_logits=True)
        logits_t, state_t = torch_model.forward(tokens, state_t, all_logits=True)
        assert (logits_n - logits_t).abs().max().item() <= tol * logits_scale(logits_t), step
    for a, b in zip(state_n.tensors(), state_t.tensors()):
        assert (a - b).abs().max().item() <= tol * max(b.abs().max().item(), 1e-6)
    one = RWKV5.from_checkpoint(ck, dtype=dtype, kernel="native")  # B=1, long chunk: same as the torch path too
    tokens = torch.randint(0, 65536, (1, 40), generator=g)
    got, s1 = one.forward(tokens, one.init_state(1))
    want, s2 = torch_model.forward(tokens, torch_model.init_state(1))
    assert (got - want).abs().max().item() <= tol * logits_scale(want)
    for a, b in zip(s1.tensors(), s2.tensors()):
        assert (a - b).abs().max().item() <= tol * max(b.abs().max().item(), 1e-6)


def test_auto_kernel_follows_the_rule():
    """auto = dual exactly where the measured rule says oneDNN's large GEMMs win (bf16: AVX512_BF16 or AMX; fp32:
    AVX-512), native elsewhere; the rule itself on made-up flag sets."""
    assert dual_helps(torch.bfloat16, {"avx2", "avx512f", "avx512_bf16"})
    assert dual_helps(torch.bfloat16, {"avx2", "amx_bf16"})
    assert not dual_helps(torch.bfloat16, {"avx2", "fma", "avx512f"})  # no bf16 dot products: native wins
    assert dual_helps(torch.float32, {"avx512f"}) and not dual_helps(torch.float32, {"avx2", "fma"})
    assert not dual_helps(torch.float16, {"avx512f", "avx512_bf16", "amx_bf16"})  # oneDNN takes no fp16 here
    if not CAN_BUILD:
        return
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        expected = "dual" if dual_helps(dtype) else "native"
        assert choose_kernel(torch.randn(32, 16).to(dtype), "auto") == expected, dtype


@native
@pytest.mark.parametrize("dtype", DUAL_DTYPES, ids=str)
def test_dual_kernel_dispatches_by_rows(dtype):
    """A dual Linear gives, bit for bit, the native kernel's result below its threshold and oneDNN's from it."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(80, 48, generator=g).to(dtype)
    dual, nat, dnn = Linear(w.clone(), "dual"), Linear(w.clone(), "native"), Linear(w.clone(), "onednn")
    threshold = ONEDNN_FROM_ROWS[dtype]
    assert dual.kernel == "dual" and dual.onednn_from_rows == threshold
    for rows in (1, threshold - 1, threshold, 3 * threshold):
        x = torch.randn(rows, 48, generator=g)
        expected = nat(x) if rows < threshold else dnn(x)
        assert torch.equal(dual(x), expected), rows
    x = torch.randn(2, threshold, 48, generator=g)  # rows are counted over every leading dimension
    assert torch.equal(dual(x), dnn(x))


@native
@pytest.mark.parametrize("kernel", ["native", "dual"])
def test_native_block_at_a_width_that_is_no_multiple_of_8_rows(tmp_path, kernel):
    """The block's vector loops (8 floats at a time) end in a padded tail when rows x width is no multiple of 8:
    D = 20 (five heads of 4), odd row counts, below and above the dual model's oneDNN threshold."""
    from worker.checkpoint import make_random_checkpoint

    ck = make_random_checkpoint(tmp_path / "L2-D20.pth", 2, 20, seed=5, head_size=4)
    model = RWKV5.from_checkpoint(ck, kernel=kernel)
    reference = RWKV5.from_checkpoint(ck, kernel=kernel)
    reference._native_blocks = None  # the torch path over the same matmuls
    assert model._native_blocks is not None
    g = torch.Generator().manual_seed(3)
    for batch, length in ((1, 1), (3, 5), (1, 33), (3, 13)):  # 20, 300, 660 and 780 values per row of work
        tokens = torch.randint(0, 65536, (batch, length), generator=g)
        got, s1 = model.forward(tokens, model.init_state(batch), all_logits=True)
        want, s2 = reference.forward(tokens, reference.init_state(batch), all_logits=True)
        assert (got - want).abs().max().item() <= 1e-5 * logits_scale(want), (batch, length)
        for a, b in zip(s1.tensors(), s2.tensors()):
            assert (a - b).abs().max().item() <= 1e-5 * max(b.abs().max().item(), 1e-6)


@native
@pytest.mark.parametrize("dtype", DUAL_DTYPES, ids=str)
def test_dual_model_multiplies_large_calls_through_onednn(tmp_path, dtype):
    """A dual model's native block multiplies with the native kernels below the threshold (same bits as the native
    model) and through its oneDNN weights from it, decode batches and prefill chunks alike. Shown by handing the dual
    model the oneDNN weights of other matrices (a second checkpoint that differs from the first only in the blocks'
    matrices): large calls then follow the second checkpoint (its oneDNN model), small calls the first."""
    from worker.checkpoint import make_random_checkpoint

    first = make_random_checkpoint(tmp_path / "a.pth", 2, 64, seed=1)
    sd = torch.load(first)
    g = torch.Generator().manual_seed(2)
    for name, t in sd.items():
        if name.startswith("blocks.") and t.dim() == 2 and min(t.shape) >= 64:  # r/k/v/g/output, ffn key/value/r
            sd[name] = torch.randn(t.shape, generator=g, dtype=torch.float32).mul_(t.float().std()).to(t.dtype)
    second = tmp_path / "b.pth"
    torch.save(sd, second)
    dual = RWKV5.from_checkpoint(first, dtype=dtype, kernel="dual")
    dual._native_onednn = RWKV5.from_checkpoint(second, dtype=dtype, kernel="dual")._native_onednn
    native_first = RWKV5.from_checkpoint(first, dtype=dtype, kernel="native")
    onednn_second = RWKV5.from_checkpoint(second, dtype=dtype, kernel="onednn")
    threshold = ONEDNN_FROM_ROWS[dtype]
    # bf16: the head of a one-row call is the native kernel's (fp32 x), the oneDNN model's casts x to bf16
    tol = 1e-5 if dtype == torch.float32 else 4e-2
    for batch, length in ((1, 1), (2, 1), (1, threshold - 1), (threshold, 1), (1, threshold + 3), (3, threshold)):
        tokens = torch.randint(0, 65536, (batch, length), generator=g)
        state = dual.init_state(batch)
        got, _ = dual.forward(tokens, state)
        if batch * length < threshold:
            assert torch.equal(got, native_first.forward(tokens, state)[0]), (batch, length)
        else:
            want = onednn_second.forward(tokens, state)[0]
            other = native_first.forward(tokens, state)[0]
            assert (got - want).abs().max().item() <= tol * logits_scale(want), (batch, length)
            assert (got - other).abs().max().item() > 0.1 * logits_scale(other), (batch, length)
