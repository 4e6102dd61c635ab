"""Routed-expert MLP at Ring-mini shapes: expert_mlp in bf16 and FP8, each with and without
recompute, beside megatron's SequentialMLP-style loop over experts (bf16).

    python -m benchmarks.expert_mlp [--tokens 65536] [--experts 256 32] [--hidden 2048]
        [--ffn 512]

T permuted token rows (8192 tokens x top-8) over E experts in random balanced-ish groups of
multiples of 16 (as megatron's permute pads them for FP8). For each variant: forward and
forward+backward time (triton.testing.do_bench median, ms), achieved TFLOP/s of the GEMMs, peak
memory of forward+backward above the inputs, and the bytes per row the forward saves for backward
(weights excluded). Before timing, every variant's output and gradients are compared with the
fp32 per-expert loop. The FP8 variants quantise the weights in every call (a step of one
micro-batch), except fp8_weights_cached (the later micro-batches of a step, which reuse them).
Also times the FP8 quantisers alone (the weight quantisation is a fixed cost per optimizer step
that grows with E, not with T). JSON via benchmarks.common.write_result.
"""

from benchmarks.common import environment, median_ms, write_result  # noqa: I001 (first: light)

import argparse

import torch
import torch.nn.functional as F

from kernels.fp8 import grouped as fp8g
from kernels.fp8.grouped_reference import group_offsets, padded_group_offsets
from kernels.fp8.linear import WEIGHT_CACHE
from ring_train.model.expert_mlp import expert_mlp


def balanced_counts(T: int, E: int, seed: int, align: int = 16) -> list[int]:
    """Random group sizes, multiples of `align`, within about 0.5x-1.5x of T/E, summing to T."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(E, generator=g) + 0.5
    units = T // align
    c = torch.floor(w / w.sum() * units).long()
    c[0] += units - int(c.sum())
    return (c * align).tolist()


def megatron_loop(x, probs, w1s, w2s, counts):
    """SequentialMLP's computation: per expert fc1, megatron's activation_func_with_probs (glu in
    bf16, then * probs in fp32, cast back), fc2; plain autograd, one parameter per expert."""
    outs = []
    for xe, pe, w1, w2 in zip(torch.split(x, counts), torch.split(probs, counts), w1s, w2s):
        h = xe @ w1.t()
        gate, up = torch.chunk(h, 2, dim=-1)
        a = (F.silu(gate) * up * pe.unsqueeze(-1)).to(h.dtype)
        outs.append(a @ w2.t())
    return torch.cat(outs)


def reference_fp32(x, probs, w1, w2, counts):
    leaves = [t.detach().float().requires_grad_() for t in (x, probs, w1, w2)]
    y = megatron_loop(leaves[0], leaves[1], list(leaves[2]), list(leaves[3]), counts)
    return y, leaves


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def saved_bytes_per_row(fn, exclude, T) -> float:
    ptrs = {t.data_ptr() for t in exclude}
    total = [0]

    def pack(t):
        if t.data_ptr() not in ptrs:
            total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0] / T


def peak_mib(step) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def bench_experts(T: int, E: int, d: int, F_: int) -> dict:
    counts = balanced_counts(T, E, seed=E)
    g = torch.Generator(device="cuda").manual_seed(E)
    x = torch.randn(T, d, generator=g, device="cuda").bfloat16()
    probs = torch.rand(T, generator=g, device="cuda")
    w1 = (torch.randn(E, 2 * F_, d, generator=g, device="cuda") / d ** 0.5).bfloat16()
    w2 = (torch.randn(E, d, F_, generator=g, device="cuda") / F_ ** 0.5).bfloat16()
    dy = torch.randn(T, d, generator=g, device="cuda").bfloat16()
    tpe = torch.tensor(counts, device="cuda")
    leaves = [t.requires_grad_() for t in (x, probs, w1, w2)]
    w1s = [w.detach().clone().requires_grad_() for w in w1]
    w2s = [w.detach().clone().requires_grad_() for w in w2]

    def ours(fp8, recompute, fast_accum=False, weights_cached=False):
        def forward():
            fp8g.FAST_ACCUM = fast_accum
            if not weights_cached:  # a step of one micro-batch: the weights are quantised anew
                WEIGHT_CACHE.invalidate()
            return expert_mlp(*leaves, tpe, fp8, recompute)
        return forward, leaves

    variants = {
        "megatron_loop_bf16": (lambda: megatron_loop(x, probs, w1s, w2s, counts),
                               [x, probs] + w1s + w2s),
        "bf16": ours(None, False),
        "bf16_recompute": ours(None, True),
        "fp8": ours("rowwise", False),
        "fp8_recompute": ours("rowwise", True),
        "fp8_fast_accum": ours("rowwise", False, fast_accum=True),
        # later micro-batches of a step: the FP8 weights come from the cache
        "fp8_weights_cached": ours("rowwise", False, weights_cached=True),
    }
    gemm_flop = 2 * T * d * 3 * F_  # fc1 (2F outputs) + fc2, forward
    results = {}

    # Accuracy first: every variant's y and gradients against the fp32 loop.
    y_ref, ref_leaves = reference_fp32(x, probs, w1, w2, counts)
    y_ref.backward(dy.float())
    ref = {"y": y_ref.detach(), "dx": ref_leaves[0].grad, "dprobs": ref_leaves[1].grad,
           "dw1": ref_leaves[2].grad, "dw2": ref_leaves[3].grad}
    del y_ref, ref_leaves
    for name, (forward, params) in variants.items():
        y = forward()
        grads = torch.autograd.grad(y, params, dy)
        if name == "megatron_loop_bf16":
            grads = list(grads[:2]) + [torch.stack(grads[2:2 + E]), torch.stack(grads[2 + E:])]
        got = dict(zip(("y", "dx", "dprobs", "dw1", "dw2"), [y.detach()] + list(grads)))
        results[name] = {"rel_err_vs_fp32": {k: rel(got[k], ref[k]) for k in ref}}
        del y, grads, got
    del ref
    fp8g.FAST_ACCUM = False

    for name, (forward, params) in variants.items():
        def step(forward=forward, params=params):
            torch.autograd.grad(forward(), params, dy)

        r = results[name]
        r["fwd_ms"] = median_ms(forward)
        r["fwd_bwd_ms"] = median_ms(step)
        recompute_flop = 2 * T * d * 2 * F_ if name.endswith("recompute") else 0
        r["fwd_bwd_tflops"] = (3 * gemm_flop + recompute_flop) / (r["fwd_bwd_ms"] * 1e9)
        r["peak_mib_fwd_bwd"] = peak_mib(step)
        weights = [p for p in params if p.dim() > 1 and p is not x]
        r["saved_bytes_per_row"] = saved_bytes_per_row(forward, weights, T)
        print(f"E={E:4d} {name:20s} fwd {r['fwd_ms']:7.3f} ms  fwd+bwd {r['fwd_bwd_ms']:7.3f} ms "
              f"({r['fwd_bwd_tflops']:6.1f} TFLOP/s)  peak {r['peak_mib_fwd_bwd']:8.1f} MiB  "
              f"saved {r['saved_bytes_per_row']:7.1f} B/row  "
              f"err y {r['rel_err_vs_fp32']['y']:.2e} dw1 {r['rel_err_vs_fp32']['dw1']:.2e}")
        fp8g.FAST_ACCUM = False

    # The FP8 quantisers alone.
    offs, poffs = group_offsets(tpe, x.device), padded_group_offsets(tpe, x.device)
    h = torch.randn(T, 2 * F_, device="cuda").bfloat16()
    xd = x.detach()
    quant = {
        "rows_x": lambda: fp8g.quantize_rows(xd),
        "group_columns_x": lambda: fp8g.quantize_group_columns(xd, offs, poffs),
        "swiglu_rows": lambda: fp8g.quantize_swiglu_rows(h, probs.detach()),
        "swiglu_columns": lambda: fp8g.quantize_swiglu_columns(h, probs.detach(), offs, poffs),
        "weight_w1": lambda: fp8g.quantize_expert_weight(w1.detach()),
        "weight_w1_transposed": lambda: fp8g.quantize_expert_weight(w1.detach(), True),
        "weight_w2": lambda: fp8g.quantize_expert_weight(w2.detach()),
        "weight_w2_transposed": lambda: fp8g.quantize_expert_weight(w2.detach(), True),
    }
    results["quantiser_ms"] = {k: median_ms(fn) for k, fn in quant.items()}
    print(f"E={E:4d} quantisers (ms): " + ", ".join(f"{k} {v:.3f}" for k, v in
                                                   results["quantiser_ms"].items()))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=65536, help="permuted rows (8192 x top-8)")
    parser.add_argument("--experts", type=int, nargs="+", default=[256, 32])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=512, help="moe_intermediate_size F")
    args = parser.parse_args()
    print(environment())
    payload = {"shapes": {"tokens": args.tokens, "hidden": args.hidden, "ffn": args.ffn,
                          "experts": args.experts, "group_sizes": "balanced-ish, multiples of 16"},
               "results": {}}
    for E in args.experts:
        payload["results"][str(E)] = bench_experts(args.tokens, E, args.hidden, args.ffn)
        torch.cuda.empty_cache()
    print(write_result("expert_mlp", payload))


if __name__ == "__main__":
    main()
