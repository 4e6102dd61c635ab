"""The fused MoE router (gate GEMM + sigmoid group-limited top-k routing) against megatron-core's
router functions, and FusedTopKRouter against megatron's TopKRouter.

Routing is compared with megatron's `topk_routing_with_score_function` on the same fp32 logits:
the chosen experts and counts are equal (random inputs have no ties), probabilities and logit
gradients agree to fp32 round-off (< 1e-5 relative; sums run in different orders). The gate GEMM
is compared with megatron's upcast-then-multiply: equal forward products (bf16 products are exact
in fp32), gradients to bf16 round-off (the fp32 logit gradient enters the backward GEMMs as two
bf16 terms). Without a GPU the routing kernels run in Triton's interpreter and the gate GEMMs on
upcast copies, at small shapes; the `gpu` tests run Ring-mini shapes.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.moe_utils import (
    MoEAuxLossAutoScaler,
    get_default_pg_collection,
    router_gating_linear,
    topk_routing_with_score_function,
)
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.transformer_config import TransformerConfig

import kernels.moe_router as moe_router
from kernels.moe_router.reference import sigmoid_topk_routing_reference
import kernels.moe_router.logits as logits_module
from kernels.moe_router.logits import router_logits_fp32
from kernels.moe_router.triton_ops import sigmoid_topk_routing_triton
from ring_train.model.router import FusedTopKRouter
from ring_train.parallel.megatron_patches import apply_patches
from tests.kernels.kernel_testing import DEVICE, FP32_TOL, rel_err


@dataclasses.dataclass(frozen=True)
class Case:
    T: int = 48
    E: int = 16
    topk: int = 4
    groups: int = 4
    group_topk: int = 2
    scaling: float = 2.5
    bias: bool = True


CASES = {
    "grouped": Case(),
    "ungrouped": Case(groups=1, group_topk=0),
    "no-bias-no-scaling": Case(bias=False, scaling=0.0),
    "top1": Case(topk=1, groups=1, group_topk=0),
    "ring-ratios": Case(T=24, E=32, topk=8, groups=8, group_topk=4),
}


def inputs(case: Case, seed=0, device=DEVICE):
    g = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(case.T, case.E, generator=g, device=device)
    bias = 0.1 * torch.randn(case.E, generator=g, device=device) if case.bias else None
    grad = torch.randn(case.T, case.E, generator=g, device=device)
    return logits, bias, grad


def megatron_routing(logits, bias, case: Case, grad):
    leaf = logits.detach().clone().requires_grad_(True)
    probs, routing_map = topk_routing_with_score_function(
        leaf, case.topk, num_groups=case.groups if case.group_topk else None,
        group_topk=case.group_topk or None, scaling_factor=case.scaling or None,
        score_function="sigmoid", expert_bias=bias)
    (probs * grad).sum().backward()
    return probs.detach(), routing_map, leaf.grad


def routing_kwargs(case: Case, bias):
    return dict(expert_bias=bias, num_groups=case.groups if case.group_topk else None,
                group_topk=case.group_topk or None, scaling_factor=case.scaling or None)


@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("name", list(CASES))
def test_routing_matches_megatron(impl, name):
    case = CASES[name]
    logits, bias, grad = inputs(case)
    probs, routing_map, dlogits = megatron_routing(logits, bias, case, grad)
    fn = sigmoid_topk_routing_triton if impl == "triton" else sigmoid_topk_routing_reference
    leaf = logits.clone().requires_grad_(True)
    routed = fn(leaf, case.topk, **routing_kwargs(case, bias))
    (routed.probs * grad).sum().backward()
    assert torch.equal(routed.routing_map, routing_map)
    assert torch.equal(routed.tokens_per_expert, routing_map.sum(0).int())
    assert rel_err(routed.probs, probs) < FP32_TOL
    assert rel_err(leaf.grad, dlogits) < FP32_TOL
    # top-k outputs: the chosen experts in order of decreasing biased score, their probs
    assert routed.topk_indices.dtype == torch.int32
    assert torch.equal(routed.topk_probs, routed.probs.gather(1, routed.topk_indices.long()))
    biased = torch.sigmoid(logits) + (0 if bias is None else bias)
    order = biased.gather(1, routed.topk_indices.long())
    assert (order[:, :-1] >= order[:, 1:]).all()


def test_gradient_through_topk_probs_equals_dense_probs():
    case = CASES["grouped"]
    logits, bias, grad = inputs(case, seed=3)
    leaves = [logits.clone().requires_grad_(True) for _ in range(2)]
    dense = sigmoid_topk_routing_triton(leaves[0], case.topk, **routing_kwargs(case, bias))
    (dense.probs * grad).sum().backward()
    compact = sigmoid_topk_routing_triton(leaves[1], case.topk, **routing_kwargs(case, bias))
    (compact.topk_probs * grad.gather(1, compact.topk_indices.long())).sum().backward()
    assert rel_err(leaves[1].grad, leaves[0].grad) < FP32_TOL


def test_unsupported_shapes_are_named():
    assert "power of two" in moe_router.unsupported_reason(24, 4, None, None)
    assert "group_topk" in moe_router.unsupported_reason(16, 4, 4, 3)
    with pytest.raises(ValueError, match="fused MoE routing"):
        sigmoid_topk_routing_triton(torch.zeros(2, 12), 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_gate_gemm_matches_megatron(dtype):
    apply_patches()  # megatron's router GEMM reads an undefined name without Transformer Engine
    g = torch.Generator(device=DEVICE).manual_seed(5)
    x = torch.randn(3, 23, 64, generator=g, device=DEVICE).to(dtype)
    w = (0.05 * torch.randn(16, 64, generator=g, device=DEVICE)).to(dtype)
    d_logits = torch.randn(3, 23, 16, generator=g, device=DEVICE)
    ref_x, ref_w = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ref = router_gating_linear(ref_x, ref_w, None, torch.float32)
    ref.backward(d_logits)
    x, w = x.requires_grad_(True), w.requires_grad_(True)
    logits = router_logits_fp32(x, w)
    logits.backward(d_logits)
    assert logits.dtype == torch.float32 and logits.shape == ref.shape
    assert rel_err(logits, ref) < 1e-6
    # megatron rounds its fp32 gradients to the operands' dtype, as the kernel does
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-6
    assert x.grad.dtype == dtype and w.grad.dtype == dtype
    assert rel_err(x.grad, ref_x.grad) < tol
    assert rel_err(w.grad, ref_w.grad) < tol


def test_logit_gradient_split_keeps_fp32_precision():
    g = torch.randn(64, 32, generator=torch.Generator().manual_seed(0)) * torch.logspace(-6, 6, 32)
    parts = logits_module._split(g, torch.bfloat16)
    assert parts.dtype == torch.bfloat16 and parts.shape == (64, 64)
    residual = (parts[:, :32].float() + parts[:, 32:].float() - g).abs()
    assert (residual <= g.abs() * 2.0 ** -17).all()
    assert not (parts[:, :32].float() == g).all()  # the low terms carry something


def test_dispatch_runs_triton_on_cuda_or_under_the_interpreter(monkeypatch):
    x = torch.zeros(2, 4, device=DEVICE)
    assert moe_router.triton_runs(x)
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert not moe_router.triton_runs(x)


# -- the router module ----------------------------------------------------------------------


@pytest.fixture(autouse=True)
def restore_aux_loss_scale():
    """A backward through megatron's z-/aux-loss outside a pipeline schedule leaves a 0-d
    MoEAuxLossAutoScaler.main_loss_backward_scale behind, which the next schedule in this
    process cannot copy its [1] scale into."""
    saved = MoEAuxLossAutoScaler.main_loss_backward_scale
    yield
    MoEAuxLossAutoScaler.main_loss_backward_scale = saved


def router_config(fused: bool, **overrides):
    fields = dict(
        num_layers=1, hidden_size=64, num_attention_heads=4, ffn_hidden_size=32,
        num_moe_experts=16, moe_ffn_hidden_size=16, moe_router_topk=4,
        moe_router_num_groups=4, moe_router_group_topk=2, moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True, moe_router_topk_scaling_factor=2.5,
        moe_router_dtype="fp32", moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
        moe_z_loss_coeff=1e-3, add_bias_linear=False, use_cpu_initialization=True,
        gated_linear_unit=True, activation_func=F.silu, calculate_per_token_loss=True,
    )
    fields.update(overrides)
    config = TransformerConfig(**fields)
    config.fused_kernels = fused  # the HybridTransformerConfig field, set on the base config
    return config


def run_router(router, x, d_probs, padding_mask=None):
    x = x.clone().requires_grad_(True)
    probs, routing_map = router(x, padding_mask)
    (probs * d_probs).sum().backward()
    return probs.detach(), routing_map, x.grad, router.weight.grad.clone()


def make_routers():
    torch.manual_seed(7)
    groups = get_default_pg_collection()
    unfused = TopKRouter(config=router_config(False), pg_collection=groups).to(DEVICE)
    fused = FusedTopKRouter(config=router_config(True), pg_collection=groups).to(DEVICE)
    fused.load_state_dict(unfused.state_dict())
    for r in (unfused, fused):
        r.expert_bias.copy_(0.05 * torch.arange(16.0, device=DEVICE).sin())
    return unfused, fused


def router_inputs():
    g = torch.Generator(device=DEVICE).manual_seed(8)
    x = torch.randn(12, 2, 64, generator=g, device=DEVICE)
    d_probs = torch.randn(24, 16, generator=g, device=DEVICE)
    padding = torch.rand(12, 2, generator=g, device=DEVICE) > 0.7  # True: a padding token
    return x, d_probs, padding


def test_fused_router_matches_megatron_router(single_process, monkeypatch):
    calls = []
    real = moe_router.sigmoid_topk_routing
    monkeypatch.setattr(moe_router, "sigmoid_topk_routing",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    unfused, fused = make_routers()
    x, d_probs, _ = router_inputs()
    ref = run_router(unfused, x, d_probs)
    assert calls == []
    out = run_router(fused, x, d_probs)
    assert calls == [1]
    assert torch.equal(out[1], ref[1])
    for got, want in zip(out[:1] + out[2:], ref[:1] + ref[2:]):
        assert rel_err(got, want) < FP32_TOL
    # the expert-bias bookkeeping saw the same tokens (from the kernel's counts)
    assert torch.equal(fused.local_tokens_per_expert, unfused.local_tokens_per_expert)


def test_fused_router_with_padding_mask_counts_only_real_tokens(single_process):
    # megatron's own router raises here (its bias bookkeeping cannot broadcast the mask), so
    # the routing is compared with the unmasked megatron run and the counts with the mask.
    unfused, fused = make_routers()
    x, d_probs, padding = router_inputs()
    ref = run_router(unfused, x, d_probs)
    out = run_router(fused, x, d_probs, padding)
    assert torch.equal(out[1], ref[1])
    assert rel_err(out[0], ref[0]) < FP32_TOL  # (gradients differ: the z-loss skips padding)
    real_tokens = ~padding.reshape(-1, 1)
    assert torch.equal(fused.local_tokens_per_expert, (ref[1] & real_tokens).sum(0).float())


def test_unsupported_router_config_runs_megatron_path_and_says_so(single_process, caplog):
    config = router_config(True, moe_router_score_function="softmax",
                           moe_router_enable_expert_bias=False)
    router = FusedTopKRouter(config=config, pg_collection=get_default_pg_collection())
    x = torch.randn(4, 1, 64, device=DEVICE)
    with caplog.at_level("WARNING"):
        assert not router._fused(x)
    assert "fused MoE router not used" in caplog.text and "softmax" in caplog.text
    config.fused_kernels = False  # read per call
    caplog.clear()
    assert not router._fused(x) and caplog.text == ""


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_ring_mini_shapes_match_megatron_on_gpu(dtype):
    T, d, E, k = 8192, 2048, 256, 8
    case = Case(T=T, E=E, topk=k, groups=8, group_topk=4)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(T, d, generator=g, device="cuda").to(dtype)
    w = (0.02 * torch.randn(E, d, generator=g, device="cuda")).to(dtype)
    bias = 0.01 * torch.randn(E, generator=g, device="cuda")
    d_probs = torch.randn(T, E, generator=g, device="cuda")
    ref_x, ref_w = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    apply_patches()
    ref_logits = router_gating_linear(ref_x, ref_w, None, torch.float32)
    probs, routing_map, _ = megatron_routing(ref_logits.detach(), bias, case, d_probs)
    # megatron's full chain, for the gradients of x and w
    leaf = ref_logits.detach().clone().requires_grad_(True)
    p, _ = topk_routing_with_score_function(leaf, k, num_groups=8, group_topk=4,
                                            scaling_factor=2.5, score_function="sigmoid",
                                            expert_bias=bias)
    (p * d_probs).sum().backward()
    ref_logits.backward(leaf.grad)
    x, w = x.requires_grad_(True), w.requires_grad_(True)
    logits = router_logits_fp32(x, w)
    # fp32 accumulation over d=2048 in another order than cuBLAS: measured 2.1e-6 on the H100.
    assert rel_err(logits, ref_logits) < 1e-5
    routed = sigmoid_topk_routing_triton(logits, k, **routing_kwargs(case, bias))
    (routed.probs * d_probs).sum().backward()
    # bf16 products are exact; the sums' order differs, which may swap near-tied experts
    agree = (routed.routing_map == routing_map).all(dim=1).float().mean().item()
    assert agree > 0.999, agree
    same = (routed.routing_map == routing_map).all(dim=1)
    assert rel_err(routed.probs[same], probs[same]) < FP32_TOL
    assert rel_err(x.grad, ref_x.grad) < 2e-2
    assert rel_err(w.grad, ref_w.grad) < 2e-2
