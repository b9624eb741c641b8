"""The engine equals the reference package, in sequence and step mode, batched and alone, across shapes."""
from __future__ import annotations

import pytest
import torch

from tests.reference import reference_model, reference_run, reference_wkv
from worker.checkpoint import make_random_checkpoint, random_params
from worker.model import RWKV5, CheckpointError, logits_scale, wkv_chunked, wkv_step

SHAPES = [(1, 64), (2, 320), (4, 128)]  # n_layer=1, a width that is not a power of two, a deeper one
FP32_TOL = 1e-4  # max |ours - reference| / RMS(reference logits)
BF16_TOL = 0.08  # bf16 weights against the fp32 reference: 8 significant bits, compounded over the layers


@pytest.fixture(scope="module", params=SHAPES, ids=[f"L{l}-D{d}" for l, d in SHAPES])
def checkpoint(request, tmp_path_factory):
    n_layer, n_embd = request.param
    return make_random_checkpoint(tmp_path_factory.mktemp("ck") / f"L{n_layer}-D{n_embd}.pth", n_layer, n_embd,
                                  seed=n_layer * 1000 + n_embd)


@pytest.fixture(scope="module")
def pair(checkpoint):
    return RWKV5.from_checkpoint(checkpoint), reference_model(checkpoint)


def _tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, 65536, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _assert_close(ours: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    err = (ours.float() - ref.float()).abs().max().item() / logits_scale(ref)
    assert err <= tol, f"max |diff| / scale = {err:.3g} > {tol}"


@pytest.mark.parametrize("prompt_len", [1, 7, 33, 600])
def test_prefill_then_steps_equal_reference(pair, prompt_len):
    model, ref = pair
    prompt, steps = _tokens(prompt_len, prompt_len), _tokens(50, prompt_len + 1)
    logits, state = model.forward(torch.tensor([prompt]), model.init_state(1))
    ref_logits, ref_state = reference_run(ref, prompt)
    _assert_close(logits[0], ref_logits, FP32_TOL)
    for tok in steps:
        logits, state = model.forward(torch.tensor([[tok]]), state)
        ref_logits, ref_state = ref.forward([tok], ref_state)
        _assert_close(logits[0], ref_logits, FP32_TOL)
    for i in range(model.config.n_layer):
        ref_wkv = reference_wkv(ref_state, i)
        assert torch.allclose(state.wkv[i, 0], ref_wkv, rtol=1e-4, atol=1e-4 * ref_wkv.abs().max().item())


def test_bf16_within_stated_bound(checkpoint, pair):
    _, ref = pair
    model = RWKV5.from_checkpoint(checkpoint, dtype=torch.bfloat16)
    prompt = _tokens(200, 5)
    logits, state = model.forward(torch.tensor([prompt]), model.init_state(1))
    ref_logits, ref_state = reference_run(ref, prompt)
    _assert_close(logits[0], ref_logits, BF16_TOL)
    for tok in _tokens(20, 6):
        logits, state = model.forward(torch.tensor([[tok]]), state)
        ref_logits, ref_state = ref.forward([tok], ref_state)
    _assert_close(logits[0], ref_logits, BF16_TOL)
    assert state.wkv.dtype == torch.float32


@pytest.mark.parametrize("chunk", [1, 5, 31, 32, 100])
def test_chunked_prefill_equals_one_call_and_steps(pair, chunk):
    model, _ = pair
    tokens = torch.tensor([_tokens(100, 11)])
    whole, s_whole = model.forward(tokens, model.init_state(1))
    state = model.init_state(1)
    for i in range(0, 100, chunk):
        part, state = model.forward(tokens[:, i : i + chunk], state)
    scale = logits_scale(whole)
    assert (part - whole).abs().max().item() / scale < 1e-5
    assert torch.allclose(state.wkv, s_whole.wkv, rtol=1e-4, atol=1e-4)
    assert torch.allclose(state.att_shift, s_whole.att_shift, atol=1e-5)


def test_all_logits_match_stepwise(pair):
    model, _ = pair
    tokens = torch.tensor([_tokens(40, 3)])
    every, _ = model.forward(tokens, model.init_state(1), all_logits=True)
    assert every.shape == (1, 40, model.config.vocab_size)
    state = model.init_state(1)
    for t in range(40):
        one, state = model.forward(tokens[:, t : t + 1], state)
        assert (one[0] - every[0, t]).abs().max().item() / logits_scale(one) < 1e-5


def test_batched_step_equals_each_session_alone(pair):
    model, _ = pair
    # Four sessions at different positions (different prompt lengths), then 10 batched steps.
    prompts = [_tokens(n, 100 + n) for n in (1, 9, 40, 130)]
    alone = []
    states = []
    for p in prompts:
        _, s = model.forward(torch.tensor([p]), model.init_state(1))
        states.append(s)
    nxt = [_tokens(10, 200 + i) for i in range(4)]
    batched_state = type(states[0]).cat(states)
    for i, s in enumerate(states):
        logs = []
        for tok in nxt[i]:
            lg, s = model.forward(torch.tensor([[tok]]), s)
            logs.append(lg[0])
        alone.append((logs, s))
    for t in range(10):
        lg, batched_state = model.forward(torch.tensor([[nxt[i][t]] for i in range(4)]), batched_state)
        for i in range(4):
            # Not bit-identical: BLAS sums in another order for another batch size.
            assert (lg[i] - alone[i][0][t]).abs().max().item() / logits_scale(lg[i]) < FP32_TOL
    for i, s in enumerate(batched_state.split()):
        assert torch.allclose(s.wkv, alone[i][1].wkv, rtol=1e-4, atol=1e-4)


def test_batched_prefill_equals_alone(pair):
    model, _ = pair
    a, b = _tokens(50, 1), _tokens(50, 2)
    both, _ = model.forward(torch.tensor([a, b]), model.init_state(2))
    one, _ = model.forward(torch.tensor([b]), model.init_state(1))
    assert (both[1] - one[0]).abs().max().item() / logits_scale(one) < FP32_TOL


def test_forward_does_not_modify_input_state(pair):
    model, _ = pair
    _, state = model.forward(torch.tensor([_tokens(10, 1)]), model.init_state(1))
    before = state.clone()
    model.forward(torch.tensor([_tokens(10, 2)]), state)
    model.forward(torch.tensor([[5]]), state)
    assert state.equal(before)


def test_wkv_chunked_exact_for_tiny_decays():
    # w = exp(-exp(5)) ~ 1e-65 underflows to 0: powers of w must never be divided by.
    g = torch.Generator().manual_seed(0)
    B, H, T, N = 2, 3, 70, 64
    r, k, v = (torch.randn(B, H, T, N, generator=g) for _ in range(3))
    time_decay = torch.randn(H, N, generator=g) * 3
    time_decay[0, :8] = 5.0
    log_w = -torch.exp(time_decay)
    u = torch.randn(H, N, generator=g)
    s0 = torch.randn(B, H, N, N, generator=g)
    y, s = wkv_chunked(r, k, v, log_w, u, s0, chunk=32)
    ys, st = [], s0
    for t in range(T):
        yt, st = wkv_step(r[:, :, t].contiguous(), k[:, :, t].contiguous(), v[:, :, t].contiguous(),
                          torch.exp(log_w), u, st)
        ys.append(yt)
    assert torch.isfinite(y).all() and torch.isfinite(s).all()
    assert torch.allclose(y, torch.stack(ys, dim=2), rtol=1e-4, atol=1e-3)
    assert torch.allclose(s, st, rtol=1e-4, atol=1e-3)


def test_config_read_from_shapes(pair):
    model, _ = pair
    sd = random_params(1, 320, vocab_size=1000)
    from worker.model import config_from_params

    cfg = config_from_params(sd)
    shapes = (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.head_size, cfg.ffn_size, cfg.vocab_size)
    assert shapes == (1, 320, 5, 64, 1120, 1000)


def test_fp16_weights_load_and_agree(tmp_path):
    path = make_random_checkpoint(tmp_path / "h.pth", 7, 128, seed=3, dtype=torch.float16)  # 7 layers: rescale kicks in
    ref = reference_model(path)
    model = RWKV5.from_checkpoint(path, dtype=torch.float16)
    prompt = _tokens(30, 9)
    logits, _ = model.forward(torch.tensor([prompt]), model.init_state(1))
    ref_logits, _ = reference_run(ref, prompt)
    _assert_close(logits[0], ref_logits, BF16_TOL / 4)


# --- refusing what is not an RWKV-5.2 checkpoint ---------------------------------------------------------------


def _save(tmp_path, sd, name="x.pth"):
    path = tmp_path / name
    torch.save(sd, path)
    return path


@pytest.mark.parametrize(
    "mutate, found",
    [
        (lambda sd: {k.replace("time_decay", "time_maa_x"): v for k, v in sd.items()}, "RWKV-6"),
        (lambda sd: {**sd, "blocks.0.att.r_k": torch.zeros(2, 64)}, "RWKV-7"),
        (lambda sd: {k: v for k, v in sd.items() if ".gate." not in k}, "RWKV-5.0"),
        (lambda sd: {k: (v.reshape(-1, 1) if "time_decay" in k else v) for k, v in sd.items()}, "RWKV-5.1"),
        (lambda sd: {k.replace("time_faaaa", "time_first"): v for k, v in sd.items() if "ln_x" not in k}, "RWKV-4"),
        (lambda sd: {k: v for k, v in sd.items() if k != "blocks.1.ffn.value.weight"}, "blocks.1.ffn.value.weight"),
        (lambda sd: {k: v for k, v in sd.items() if k != "head.weight"}, "head.weight"),
    ],
    ids=["v6", "v7", "v5.0", "v5.1", "v4", "missing-ffn", "missing-head"],
)
def test_refuses_other_architectures_and_missing_keys(tmp_path, mutate, found):
    sd = mutate(random_params(2, 64, vocab_size=100))
    with pytest.raises(CheckpointError, match=found.replace(".", r"\.")):
        RWKV5.from_checkpoint(_save(tmp_path, sd))


def test_refuses_truncated_and_garbage_files(tmp_path):
    good = make_random_checkpoint(tmp_path / "good.pth", 1, 64, vocab_size=100)
    data = good.read_bytes()
    (tmp_path / "trunc.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.pth").write_bytes(b"\x00not a checkpoint" * 100)
    for name in ("trunc.pth", "junk.pth", "missing.pth"):
        with pytest.raises(CheckpointError, match=name):
            RWKV5.from_checkpoint(tmp_path / name)


def test_loads_with_mmap_not_two_copies(tmp_path):
    import resource
    import subprocess
    import sys

    # A 16-bit file loaded in its own dtype on CPU: the weights are used straight from the mapping or copied once.
    path = make_random_checkpoint(tmp_path / "big.pth", 4, 1024, dtype=torch.bfloat16)
    size = path.stat().st_size
    code = (
        "import resource, torch; from worker.model import RWKV5; "
        f"m = RWKV5.from_checkpoint({str(path)!r}, dtype=torch.bfloat16); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"
    )
    base_code = "import torch; import resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"
    base = subprocess.run([sys.executable, "-c", base_code], capture_output=True, text=True, check=True)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    grew = int(out.stdout.split()[-1]) - int(base.stdout.split()[-1])
    # The embedding is also kept normalised in fp32 (ln0 folded in): allow that on top of one copy.
    emb_fp32 = 65536 * 1024 * 4
    assert grew < 1.5 * size + emb_fp32, f"peak RSS grew {grew / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB file"
    del resource


# --- the same model code trains ----------------------------------------------------------------------------------


def test_trainable_forward_equals_inference_and_has_gradients(checkpoint):
    inference = RWKV5.from_checkpoint(checkpoint)
    model = RWKV5.from_checkpoint(checkpoint, trainable=True)
    tokens = torch.tensor([_tokens(40, 8)])
    want, want_state = inference.forward(tokens, inference.init_state(1), all_logits=True)
    for m in model.params.values():
        m.requires_grad_(True)
    init = model.init_state(1)
    init.wkv.requires_grad_(True)
    got, state = model.forward(tokens, init, all_logits=True)
    assert (got - want).abs().max().item() / logits_scale(want) < 1e-5
    assert torch.allclose(state.wkv, want_state.wkv, rtol=1e-4, atol=1e-4)
    loss = torch.nn.functional.cross_entropy(got[0, :-1], tokens[0, 1:])
    loss.backward()
    for name in ("blocks.0.att.time_decay", "blocks.0.att.time_faaaa", "blocks.0.ln0.weight", "emb.weight",
                 "head.weight", f"blocks.{model.config.n_layer - 1}.ffn.value.weight"):
        g = model.params[name].grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name
    assert init.wkv.grad is not None and init.wkv.grad.abs().sum() > 0  # state tuning trains this
    sd = model.state_dict()
    assert set(sd) == set(torch.load(checkpoint, weights_only=True))


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    path = make_random_checkpoint(tmp_path / "g.pth", 2, 64, seed=5)
    grads = []
    for ckpt in (False, True):
        model = RWKV5.from_checkpoint(path, trainable=True)
        model.grad_checkpoint = ckpt
        w = model.params["blocks.1.att.key.weight"].requires_grad_(True)
        tokens = torch.tensor([_tokens(20, 1)])
        logits, _ = model.forward(tokens, model.init_state(1), all_logits=True)
        torch.nn.functional.cross_entropy(logits[0, :-1], tokens[0, 1:]).backward()
        grads.append(w.grad.clone())
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-7)
