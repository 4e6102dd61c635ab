"""MoE router, padded permutation and grouped experts against the unfused sequences they replace.

    python -m benchmarks.moe_kernels [--tokens 8192] [--hidden 2048] [--experts 256] [--topk 8]
        [--groups 8] [--group-topk 4] [--ffn 512] [--no-experts] [--sweep]

Entries (Ring-mini shapes by default; bf16 activations and weights, fp32 router):
  router_fwd, router_fwd_bwd    fused: the gate GEMMs in cuBLAS on bf16 operands with fp32
                                accumulation and output (kernels/moe_router/logits.py) and the
                                one-kernel Triton sigmoid / expert bias / group-limited top-k /
                                normalise / scale. Unfused: megatron's TopKRouter math without
                                Transformer Engine: router_gating_linear (x and W cast to fp32,
                                fp32 GEMM) and topk_routing_with_score_function.
  permute_a{1,16,128}[_bwd]     permute (with probs) then unpermute (unweighted, as megatron's
                                dispatchers do), expert groups padded to a multiple of align.
                                Fused: kernels/moe_permute. Unfused: megatron's permute/unpermute
                                plus the padding as index copies into a zeroed buffer (and, for
                                the record, as F.pad of each expert's slice: `unfused_fpad_ms`).
  experts_E{256,32}_fwd_bwd     GroupedExperts (torch._grouped_mm) against megatron's
                                SequentialMLP on tokens*topk rows, forward and backward.
Before timing, each fused output is measured against its unfused counterpart (or reference.py);
the run exits non-zero after writing the JSON if one misses its bound. Each entry has two times
(benchmarks.common.fused_vs_unfused): as called (median of triton.testing.do_bench, ms, L2
flushed: Python and launch overheads included) and GPU time (the kernels' summed durations).
Target: fused >= 2x unfused in GPU time. Writes JSON via
benchmarks.common.write_checked_result("moe_kernels").
"""

import argparse
import dataclasses
import sys

import torch
import torch.nn.functional as F

from benchmarks.common import (fused_vs_unfused, median_ms, rel_err, sweep_configs,
                               write_checked_result)

DEVICE = "cuda"
TARGET_SPEEDUP = 2.0
ALIGNS = (1, 16, 128)


@dataclasses.dataclass(frozen=True)
class Case:
    tokens: int = 8192
    hidden: int = 2048
    experts: int = 256
    topk: int = 8
    groups: int = 8
    group_topk: int = 4
    ffn: int = 512
    scaling: float = 2.5


# -- router -----------------------------------------------------------------------------------


def router_runs(case: Case):
    from megatron.core.transformer.moe.moe_utils import (router_gating_linear,
                                                         topk_routing_with_score_function)

    from kernels.moe_router.logits import router_logits_fp32
    from kernels.moe_router.triton_ops import sigmoid_topk_routing_triton

    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(case.tokens, case.hidden, generator=g, device=DEVICE).bfloat16()
    w = (0.02 * torch.randn(case.experts, case.hidden, generator=g, device=DEVICE)).bfloat16()
    bias = 0.01 * torch.randn(case.experts, generator=g, device=DEVICE)
    d_probs = torch.randn(case.tokens, case.experts, generator=g, device=DEVICE)
    x.requires_grad_(True)
    w.requires_grad_(True)
    kw = dict(num_groups=case.groups, group_topk=case.group_topk, scaling_factor=case.scaling)

    def fused():
        logits = router_logits_fp32(x, w)
        routed = sigmoid_topk_routing_triton(logits, case.topk, expert_bias=bias, **kw)
        return logits, routed.probs, routed.routing_map

    def unfused():
        logits = router_gating_linear(x, w, None, torch.float32)
        probs, routing_map = topk_routing_with_score_function(
            logits, case.topk, score_function="sigmoid", expert_bias=bias, **kw)
        return logits, probs, routing_map

    def fwd_bwd(fn):
        def run():
            _, probs, _ = fn()
            probs.backward(d_probs)
        return run

    def accuracy():
        (lf, pf, mf), (lu, pu, mu) = fused(), unfused()
        same = (mf == mu).all(dim=1)
        grads = []
        for fn in (fused, unfused):
            x.grad = w.grad = None
            fwd_bwd(fn)()
            grads.append((x.grad.clone(), w.grad.clone()))
        (gxf, gwf), (gxu, gwu) = grads
        result = {"logits_rel_err": rel_err(lf, lu),
                  "rows_with_same_experts": same.float().mean().item(),
                  "probs_rel_err_same_rows": rel_err(pf[same], pu[same]),
                  "dx_rel_err": rel_err(gxf, gxu), "dw_rel_err": rel_err(gwf, gwu)}
        result["ok"] = (result["logits_rel_err"] < 1e-5 and result["rows_with_same_experts"] > 0.999
                        and result["probs_rel_err_same_rows"] < 1e-5
                        and result["dx_rel_err"] < 2e-2 and result["dw_rel_err"] < 2e-2)
        return result

    runs = {"router_fwd": (fused, unfused),
            "router_fwd_bwd": (fwd_bwd(fused), fwd_bwd(unfused))}
    return runs, accuracy


# -- permutation ------------------------------------------------------------------------------


def routing(case: Case):
    g = torch.Generator(device=DEVICE).manual_seed(1)
    scores = torch.rand(case.tokens, case.experts, generator=g, device=DEVICE)
    idx = scores.topk(case.topk, dim=1).indices
    routing_map = torch.zeros_like(scores, dtype=torch.bool).scatter(1, idx, True)
    probs = torch.rand(case.tokens, case.experts, generator=g, device=DEVICE) * routing_map
    return routing_map, probs


def permute_runs(case: Case, align: int):
    from megatron.core.transformer.moe.moe_utils import permute, unpermute

    from kernels.moe_permute import reference
    from kernels.moe_permute.triton_ops import permute_triton, unpermute_triton

    routing_map, probs = routing(case)
    g = torch.Generator(device=DEVICE).manual_seed(2)
    x = torch.randn(case.tokens, case.hidden, generator=g, device=DEVICE).bfloat16()
    d_out = torch.randn_like(x)
    x.requires_grad_(True)
    probs.requires_grad_(True)
    E, k = case.experts, case.topk

    def fused():
        out, out_probs, plan = permute_triton(x, routing_map, probs, max_experts_per_token=k,
                                              align=align)
        return out, out_probs, unpermute_triton(out, plan)

    def padding_index(counts):
        padded = (counts + align - 1) // align * align
        starts, pstarts = counts.cumsum(0) - counts, padded.cumsum(0) - padded
        rows = int(counts.sum())
        expert = torch.repeat_interleave(torch.arange(E, device=DEVICE), counts,
                                         output_size=rows)
        pos = pstarts[expert] + torch.arange(rows, device=DEVICE) - starts[expert]
        return pos, int(padded.sum()), padded

    def unfused():
        out, out_probs, sorted_indices = permute(x, routing_map, probs=probs)
        if align == 1:  # megatron's permutation alone
            return out, out_probs, unpermute(out, sorted_indices, x.shape,
                                             routing_map=routing_map)
        pos, rows, _ = padding_index(routing_map.sum(0))
        padded = out.new_zeros(rows, out.shape[1]).index_copy(0, pos, out)
        padded_probs = out_probs.new_zeros(rows).index_copy(0, pos, out_probs)
        unpadded = padded.index_select(0, pos)
        return padded, padded_probs, unpermute(unpadded, sorted_indices, x.shape,
                                               routing_map=routing_map)

    def unfused_fpad():
        out, out_probs, sorted_indices = permute(x, routing_map, probs=probs)
        counts = routing_map.sum(0).tolist()
        pads = [(-c) % align for c in counts]
        padded = torch.cat([F.pad(t, (0, 0, 0, p)) for t, p in zip(out.split(counts), pads)])
        padded_probs = torch.cat([F.pad(t, (0, p)) for t, p in zip(out_probs.split(counts), pads)])
        sizes = [c + p for c, p in zip(counts, pads)]
        unpadded = torch.cat([t[:c] for t, c in zip(padded.split(sizes), counts)])
        return padded, padded_probs, unpermute(unpadded, sorted_indices, x.shape,
                                               routing_map=routing_map)

    d_probs = None

    def fwd_bwd(fn):
        def run():
            nonlocal d_probs
            _, out_probs, combined = fn()
            if d_probs is None or d_probs.shape != out_probs.shape:
                d_probs = torch.ones_like(out_probs)
            torch.autograd.backward([combined, out_probs], [d_out, d_probs])
        return run

    def accuracy():
        out, out_probs, combined = fused()
        ref, ref_probs, _ = reference.permute(x.detach(), routing_map, probs.detach(),
                                              max_experts_per_token=k, align=align)
        u_out, u_probs, u_combined = unfused()
        result = {"permuted_equal_reference": bool(torch.equal(out, ref)),
                  "probs_equal_reference": bool(torch.equal(out_probs, ref_probs)),
                  "permuted_equal_unfused": bool(torch.equal(out, u_out)),
                  "combined_rel_err": rel_err(combined, u_combined)}
        result["ok"] = (result["permuted_equal_reference"] and result["probs_equal_reference"]
                        and result["permuted_equal_unfused"] and result["combined_rel_err"] < 1e-2)
        return result

    name = f"permute_a{align}"
    runs = {name: (fused, unfused), f"{name}_bwd": (fwd_bwd(fused), fwd_bwd(unfused))}
    extra = {name: unfused_fpad, f"{name}_bwd": fwd_bwd(unfused_fpad)}
    return runs, accuracy, extra


# -- experts ----------------------------------------------------------------------------------


def expert_runs(case: Case, num_experts: int):
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.transformer_config import TransformerConfig

    from ring_train.model.experts import GroupedExperts

    config = TransformerConfig(
        num_layers=1, hidden_size=case.hidden, num_attention_heads=16, ffn_hidden_size=case.ffn,
        num_moe_experts=num_experts, moe_ffn_hidden_size=case.ffn, moe_router_topk=case.topk,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        params_dtype=torch.bfloat16, bf16=True, gradient_accumulation_fusion=False,
        bias_activation_fusion=False)
    submodules = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    groups = get_default_pg_collection()
    sequential = SequentialMLP(num_experts, config, submodules, groups).to(DEVICE)
    grouped = GroupedExperts(num_experts, config, submodules, groups).to(DEVICE)
    grouped.load_state_dict(sequential.state_dict())
    rows = case.tokens * case.topk
    g = torch.Generator(device=DEVICE).manual_seed(3)
    expert = torch.randint(0, num_experts, (rows,), generator=g, device=DEVICE)
    tokens_per_expert = torch.bincount(expert, minlength=num_experts).cpu()  # as dispatchers do
    x = torch.randn(rows, case.hidden, generator=g, device=DEVICE).bfloat16().requires_grad_(True)
    probs = torch.rand(rows, generator=g, device=DEVICE).requires_grad_(True)
    d_out = torch.randn(rows, case.hidden, generator=g, device=DEVICE).bfloat16()

    def run(module):
        def step():
            out, _ = module(x, tokens_per_expert, probs)
            out.backward(d_out)
            return out
        return step

    def accuracy():
        results = []
        for module in (grouped, sequential):
            x.grad = probs.grad = None
            module.zero_grad(set_to_none=True)
            out = run(module)()
            fc1 = torch.stack([p.grad for n, p in module.named_parameters() if "fc1" in n]) \
                if module is sequential else module.fc1_weight.grad
            results.append((out.detach(), x.grad.clone(), probs.grad.clone(), fc1))
        (o, gx, gp, g1), (ro, rgx, rgp, rg1) = results
        result = {"out_rel_err": rel_err(o, ro), "dx_rel_err": rel_err(gx, rgx),
                  "dprobs_rel_err": rel_err(gp, rgp), "dfc1_rel_err": rel_err(g1, rg1)}
        result["ok"] = all(v < 2e-2 for v in result.values())
        return result

    name = f"experts_E{num_experts}_fwd_bwd"
    return {name: (run(grouped), run(sequential))}, accuracy


# -- driver -----------------------------------------------------------------------------------


def timings(runs: dict, extra: dict) -> dict:
    result = {}
    for name, (fused, unfused) in runs.items():
        entry = fused_vs_unfused(fused, unfused)
        entry["meets_target"] = entry["gpu_speedup"] >= TARGET_SPEEDUP
        if name in extra:
            entry["unfused_fpad_ms"] = median_ms(extra[name])
        result[name] = entry
        print(f"{name:24s} fused {entry['fused_ms']:8.3f} ms  unfused {entry['unfused_ms']:8.3f} "
              f"ms  speedup {entry['speedup']:5.2f}x  | GPU time {entry['fused_gpu_ms']:8.3f} / "
              f"{entry['unfused_gpu_ms']:8.3f} ms  {entry['gpu_speedup']:5.2f}x"
              + (f"  (F.pad unfused {entry['unfused_fpad_ms']:8.3f} ms)" if name in extra else ""),
              flush=True)
    return result


def sweep(runs: dict) -> list:
    """Fused router and permutation timings under a few launch configurations."""
    from kernels.moe_permute import triton_ops as permute_ops
    from kernels.moe_router import triton_ops as router_ops

    options = [
        (router_ops, "router", [{"routing_block_t": 8}, {"routing_block_t": 32},
                                {"routing_block_t": 32, "routing_warps": 8},
                                {"routing_block_t": 64, "routing_warps": 8}]),
        (permute_ops, "permute", [{"rows_block_t": 8}, {"rows_block_t": 32},
                                  {"rows_block_d": 256}, {"rows_block_d": 1024},
                                  {"plan_block_t": 32}, {"warps": 8}]),
    ]
    rows = []
    for module, prefix, overrides_list in options:
        rows += sweep_configs(module, prefix, overrides_list, runs)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--group-topk", type=int, default=4)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--no-experts", action="store_true", help="skip the expert MLP entries")
    p.add_argument("--sweep", action="store_true", help="also time launch configurations")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks.moe_kernels needs a CUDA device")
    from ring_train.parallel.distributed import init_distributed

    init_distributed()  # megatron's parallel state (SequentialMLP) and its no-TE patches
    case = Case(args.tokens, args.hidden, args.experts, args.topk, args.groups, args.group_topk,
                args.ffn)
    runs, extra, accuracy = {}, {}, {}
    r, acc = router_runs(case)
    runs.update(r)
    accuracy["router"] = acc()
    for align in ALIGNS:
        r, acc, x = permute_runs(case, align)
        runs.update(r)
        extra.update(x)
        accuracy[f"permute_a{align}"] = acc()
    if not args.no_experts:
        for num_experts in (args.experts, 32):
            r, acc = expert_runs(case, num_experts)
            runs.update(r)
            accuracy[f"experts_E{num_experts}"] = acc()
    for name, entry in accuracy.items():
        print(f"accuracy {name}: {entry}", flush=True)
    from kernels.moe_permute import triton_ops as permute_ops
    from kernels.moe_router import triton_ops as router_ops

    payload = {
        "case": dataclasses.asdict(case),
        "configs": {"router": dataclasses.asdict(router_ops.CONFIG),
                    "permute": dataclasses.asdict(permute_ops.CONFIG)},
        "target_speedup": TARGET_SPEEDUP,
        "accuracy": accuracy,
        "timings": timings(runs, extra),
        "sweep": sweep(runs) if args.sweep else [],
    }
    write_checked_result("moe_kernels", payload, all(e["ok"] for e in accuracy.values()))


if __name__ == "__main__":
    main()
