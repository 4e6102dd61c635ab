"""The split + qk-norm + RoPE kernels against the PyTorch reference, and the lightning layer with
fused kernels against its unfused path.

Tolerances: fp32 relative error < 1e-5 (orders of summation differ). bf16 forward outputs
< 1e-3 (the kernel rounds where PyTorch does; only reductions differ, which moves an element by
one bf16 step at most, rarely). bf16 gradients are measured against fp32 autograd through the
reference on the same bf16-valued inputs: < 1e-2, and no worse than the unfused bf16 path's
error times ACCURACY_FACTOR (the kernel rounds once, the unfused path after every op). Without a
GPU the kernels run in Triton's interpreter at small shapes; the `gpu` tests run Ring-mini shapes.
Every kernel output is poisoned with NaN before a launch, so an element it fails to write fails.
"""

import types

import pytest
import torch
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.packed_seq_params import PackedSeqParams

import kernels.lightning_attention as la
from kernels.qk_norm_rope import qkvg_split_norm_rope, use_triton
from kernels.qk_norm_rope.reference import qkvg_split_norm_rope_reference
from kernels.qk_norm_rope.triton_ops import (launch_backward, launch_forward,
                                             qkvg_split_norm_rope_triton, rope_tables)
from ring_train.config.model import load_model_config
from ring_train.config.parallel import ParallelConfig
from ring_train.model import lightning_attention as lightning_module
from ring_train.model.builder import build_model
from ring_train.model.norms import rms_normalize
from ring_train.model.transformer_config import to_transformer_config
from ring_train.testing.global_weights import fill_global_weights
from ring_train.training.step import packed_seq_params
from tests.kernels.kernel_testing import (BF16_FWD_TOL, DEVICE, EPS, FP32_TOL, assert_grads_match,
                                          rel_err)


def megatron_freqs(s, D, rotary_percent, device=DEVICE):
    """megatron-core's rotary_pos_emb for s positions: fp32 [s, 1, 1, rotary_dim] (its
    `get_emb`, which moves the table to CUDA first)."""
    angles = RotaryEmbedding(D, rotary_percent, use_cpu_initialization=True
                             ).get_freqs_non_repeated(s)
    return torch.cat((angles, angles), dim=-1)[:, None, None, :].to(device)


def make_inputs(s, b, H, D, rotary_percent, dtype, seed, device=DEVICE):
    g = torch.Generator(device=device).manual_seed(seed)
    qkvg = torch.randn(s, b, H * 4 * D, generator=g, device=device).to(dtype)
    q_w, k_w = ((1 + 0.2 * torch.randn(D, generator=g, device=device)).to(dtype)
                for _ in range(2))
    freqs = megatron_freqs(s, D, rotary_percent, device) if rotary_percent else None
    grads = [torch.randn(s, b, H, D, generator=g, device=device).to(dtype) for _ in range(4)]
    return qkvg, q_w, k_w, freqs, grads


def model_path(qkvg, q_w, k_w, freqs, silu, H, D):
    """The lightning layer's unfused code, with megatron-core's own RoPE entry point."""
    s, b, _ = qkvg.shape
    q, k, v, gate = qkvg.view(s, b, H, 4, D).unbind(dim=3)
    if silu:
        q, k, v = (torch.nn.functional.silu(x) for x in (q, k, v))
    q, k = q_w * rms_normalize(q, EPS), k_w * rms_normalize(k, EPS)
    config = types.SimpleNamespace(apply_rope_fusion=False, rotary_interleaved=False,
                                   multi_latent_attention=False)
    if freqs is not None:
        # cp_group is only consulted for packed (thd) inputs; the layer passes none.
        q = apply_rotary_pos_emb(q, freqs, config=config, cp_group=object())
        k = apply_rotary_pos_emb(k, freqs, config=config, cp_group=object())
    return q, k, v, gate


def run_with_grads(fn, qkvg, q_w, k_w, freqs, grads, silu, dtype=None):
    """Outputs and gradients (qkvg, q_w, k_w) of fn, on copies cast to dtype."""
    dtype = dtype or qkvg.dtype
    leaves = [x.detach().to(dtype).requires_grad_(True) for x in (qkvg, q_w, k_w)]
    outs = fn(*leaves, freqs, eps=EPS, silu=silu)
    torch.autograd.backward(outs, [g.to(dtype) for g in grads])
    return [o.detach() for o in outs], [x.grad for x in leaves]


def run_poisoned(qkvg, q_w, k_w, freqs, grads, silu):
    """Forward and backward launches into NaN-filled outputs."""
    s, b, _ = qkvg.shape
    D = q_w.numel()
    H = qkvg.shape[2] // (4 * D)
    nan = lambda *shape: torch.full(shape, float("nan"), dtype=qkvg.dtype, device=qkvg.device)
    rope = rope_tables(freqs, s, b, D, qkvg.dtype, q_w)
    outs = [nan(s, b, H, D) for _ in range(4)]
    launch_forward(qkvg, q_w, k_w, rope, EPS, silu, *outs)
    dqkvg = nan(*qkvg.shape)
    dq_w, dk_w = launch_backward(qkvg, q_w, k_w, rope, EPS, silu, *grads, dqkvg)
    return outs, [dqkvg, dq_w, dk_w]


def check_against_reference(s, b, H, D, rotary_percent, dtype, silu, seed, freqs=None):
    qkvg, q_w, k_w, default_freqs, grads = make_inputs(s, b, H, D, rotary_percent, dtype, seed)
    freqs = default_freqs if freqs is None else freqs
    outs, kernel_grads = run_poisoned(qkvg, q_w, k_w, freqs, grads, silu)
    ref_outs, ref_grads = run_with_grads(qkvg_split_norm_rope_reference, qkvg, q_w, k_w, freqs,
                                         grads, silu)
    fwd_tol = FP32_TOL if dtype == torch.float32 else BF16_FWD_TOL
    for name, o, o_ref in zip("qkvg", outs, ref_outs):
        assert torch.isfinite(o).all(), f"{name}: unwritten (NaN) elements"
        assert rel_err(o, o_ref) < fwd_tol, (name, rel_err(o, o_ref))
    _, true_grads = run_with_grads(qkvg_split_norm_rope_reference, qkvg, q_w, k_w, freqs, grads,
                                   silu, dtype=torch.float32)
    assert_grads_match(("dqkvg", "dq_weight", "dk_weight"), kernel_grads, ref_grads, true_grads,
                       dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("silu", [False, True], ids=["", "silu"])
def test_reference_is_the_layer_code_path_to_the_bit(dtype, silu):
    s, b, H, D = 11, 2, 3, 32
    qkvg, q_w, k_w, freqs, _ = make_inputs(s, b, H, D, 0.5, dtype, seed=1)
    ref = qkvg_split_norm_rope_reference(qkvg, q_w, k_w, freqs, eps=EPS, silu=silu)
    for x, y in zip(ref, model_path(qkvg, q_w, k_w, freqs, silu, H, D)):
        assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("silu", [False, True], ids=["", "silu"])
def test_partial_rope_matches_reference(dtype, silu):
    check_against_reference(13, 2, 3, 32, 0.5, dtype, silu, seed=2)


@pytest.mark.parametrize("D,rotary_percent", [(32, 1.0), (32, 0.25), (16, 0.0)],
                         ids=["full-rope", "pass-not-pow2", "no-rope"])
def test_rotary_fractions_match_reference(D, rotary_percent):
    check_against_reference(7, 3, 2, D, rotary_percent, torch.bfloat16, False, seed=3)


def test_bf16_forward_equals_the_layer_code_path_bit_for_bit():
    qkvg, q_w, k_w, freqs, _ = make_inputs(21, 2, 2, 64, 0.5, torch.bfloat16, seed=4)
    outs = qkvg_split_norm_rope_triton(qkvg, q_w, k_w, freqs, eps=EPS, silu=True)
    for o, o_ref in zip(outs, model_path(qkvg, q_w, k_w, freqs, True, 2, 64)):
        assert torch.equal(o, o_ref)


def test_per_batch_and_separate_q_k_positions_match_reference():
    s, b, D = 9, 2, 32
    g = torch.Generator(device=DEVICE).manual_seed(5)
    q_freqs = torch.rand(s, b, 1, 16, generator=g, device=DEVICE) * 50  # [s, b, 1, rot]
    k_freqs = megatron_freqs(s, D, 0.5)
    check_against_reference(s, b, 2, D, 0.5, torch.bfloat16, False, seed=5,
                            freqs=(q_freqs, k_freqs))


def test_strided_input_and_autograd_function_match_reference():
    s, b, H, D = 10, 2, 2, 32
    qkvg, q_w, k_w, freqs, grads = make_inputs(s, b, H, D, 0.5, torch.bfloat16, seed=6)
    wide = torch.zeros(s, b + 1, H * 4 * D + 8, dtype=qkvg.dtype, device=DEVICE)
    wide[:, :b, 8:] = qkvg
    strided = wide[:, :b, 8:]
    outs, kernel_grads = run_with_grads(qkvg_split_norm_rope_triton, strided, q_w, k_w, freqs,
                                        grads, True)
    ref_outs, _ = run_with_grads(qkvg_split_norm_rope_reference, qkvg, q_w, k_w, freqs, grads,
                                 True)
    for o, o_ref in zip(outs, ref_outs):
        assert o.is_contiguous() and torch.equal(o, o_ref)
    _, poisoned_grads = run_poisoned(qkvg, q_w, k_w, freqs, grads, True)
    for g, g_ref in zip(kernel_grads, poisoned_grads):
        assert torch.equal(g, g_ref.to(g.dtype))


def test_bad_freqs_shape_is_an_error():
    qkvg, q_w, k_w, freqs, _ = make_inputs(6, 1, 1, 16, 0.5, torch.float32, seed=7)
    with pytest.raises(ValueError, match="rotary freqs"):
        qkvg_split_norm_rope_triton(qkvg, q_w, k_w, freqs[:5], eps=EPS)


def test_dispatch_runs_triton_on_cuda_or_under_the_interpreter(monkeypatch):
    qkvg, q_w, k_w, freqs, _ = make_inputs(5, 1, 1, 16, 0.5, torch.float32, seed=8)
    assert use_triton(qkvg, "test")  # CUDA, or TRITON_INTERPRET=1 (tests/conftest.py) on CPU
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert not use_triton(qkvg, "test")
        outs = qkvg_split_norm_rope(qkvg, q_w, k_w, freqs, eps=EPS)
        ref = qkvg_split_norm_rope_reference(qkvg, q_w, k_w, freqs, eps=EPS)
        assert all(torch.equal(o, r) for o, r in zip(outs, ref))


@pytest.mark.gpu
@pytest.mark.parametrize("s,b,silu", [(4096, 2, False), (8192, 1, True)])
def test_ring_mini_shapes_match_reference_on_gpu(s, b, silu):
    check_against_reference(s, b, 16, 128, 0.5, torch.bfloat16, silu, seed=s + b)


# --- the lightning layer: fused kernels on vs off ------------------------------------------------

LAYER_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _layer(dtype, **model_fields):
    cfg = load_model_config("tiny", **model_fields)
    config = to_transformer_config(cfg, ParallelConfig(), params_dtype=dtype)
    layer = build_model(cfg, config).decoder.layers[0].self_attention.to(DEVICE)  # lightning
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in layer.named_parameters():  # norm weights near 1, projections small
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if p.dim() == 1 else 0.1 * noise)
    return cfg, layer


def _record_calls(monkeypatch, module, name, calls):
    kernel = getattr(module, name)

    def recorded(*args, **kwargs):
        calls.append(name)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(module, name, recorded)


def _layer_run(layer, fused, hidden, freqs, packed, d_out):
    layer.config.fused_kernels = fused  # read with getattr; the config field may not exist yet
    layer.zero_grad(set_to_none=True)
    x = hidden.detach().clone().requires_grad_(True)
    out, bias = layer(x, None, rotary_pos_emb=freqs, packed_seq_params=packed)
    assert bias is None
    out.backward(d_out)
    grads = {n: p.grad.float() for n, p in layer.named_parameters()}
    return out.float(), x.grad.float(), grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("silu,packed", [(False, True), (True, False)],
                         ids=["packed", "silu"])
def test_lightning_layer_fused_kernels_match_unfused_path(single_process, monkeypatch, dtype,
                                                          silu, packed):
    calls = []
    for name in ("qkvg_split_norm_rope", "gated_group_rms_norm"):
        _record_calls(monkeypatch, lightning_module, name, calls)
    cfg, layer = _layer(dtype, linear_silu=silu)
    s, b = (40, 1) if packed else (19, 2)
    g = torch.Generator().manual_seed(12)
    hidden = torch.randn(s, b, cfg.hidden_size, generator=g).to(dtype).to(DEVICE)
    d_out = torch.randn(s, b, cfg.hidden_size, generator=g).to(dtype).to(DEVICE)
    freqs = megatron_freqs(s, cfg.head_dim, cfg.partial_rotary_factor)
    params = None
    if packed:
        cu = torch.tensor([0, 9, 10, 27, 40], dtype=torch.int32, device=DEVICE)
        params = PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                 max_seqlen_q=s, max_seqlen_kv=s)
    # One attention backend for both paths: the comparison is about the kernels around it
    # (on GPU, the Triton attention's fp32 dots would run in tf32).
    selected = la.get_backend()
    la.set_backend("torch")
    try:
        unfused = _layer_run(layer, False, hidden, freqs, params, d_out)
        assert calls == []
        fused = _layer_run(layer, True, hidden, freqs, params, d_out)
    finally:
        la.set_backend(selected)
    assert calls == ["qkvg_split_norm_rope", "gated_group_rms_norm"]
    tol = LAYER_TOL[dtype]
    assert rel_err(fused[0], unfused[0]) < tol
    assert rel_err(fused[1], unfused[1]) < tol
    assert fused[2].keys() == unfused[2].keys() and len(fused[2]) == 5
    for name in unfused[2]:
        assert rel_err(fused[2][name], unfused[2][name]) < tol, name


def test_tiny_model_fused_kernels_match_unfused_path(single_process, monkeypatch):
    """Through GPTModel: its rotary_pos_emb and packed-sequence plumbing reach the fused path."""
    calls = []
    _record_calls(monkeypatch, lightning_module, "qkvg_split_norm_rope", calls)
    cfg = load_model_config("tiny", num_nextn_predict_layers=0)
    model = build_model(cfg, to_transformer_config(cfg, ParallelConfig())).to(DEVICE)
    fill_global_weights([model], std=0.05)
    tokens = torch.randint(0, cfg.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    tokens, positions = tokens.to(DEVICE), torch.arange(64, device=DEVICE)[None]
    packed = packed_seq_params(torch.tensor([0, 20, 21, 64], device=DEVICE), 64)
    results = []
    selected = la.get_backend()
    la.set_backend("torch")
    try:
        for fused in (False, True):
            model.config.fused_kernels = fused
            model.zero_grad(set_to_none=True)
            logits = model(tokens, positions, None, packed_seq_params=packed)
            logits.float().square().mean().backward()
            results.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()
                                              if p.grad is not None}))
    finally:
        la.set_backend(selected)
    assert len(calls) == 2  # the tiny model's two lightning layers, fused run only
    (logits, grads), (fused_logits, fused_grads) = results
    assert rel_err(fused_logits, logits) < FP32_TOL
    assert fused_grads.keys() == grads.keys()
    for name in grads:
        assert rel_err(fused_grads[name], grads[name]) < FP32_TOL, name
