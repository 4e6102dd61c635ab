"""Fused SwiGLU and RMSNorm with FP8 emission against the unfused PyTorch sequences they replace.

    python -m benchmarks.fused_mlp_kernels [--tokens 8192] [--topk 8] [--ffn 512]
        [--hidden 2048] [--sweep]

Entries (Ring-mini's routed experts and hidden size by default; FP8 = block1x128 e4m3):
  swiglu_fwd_rows       h [tokens*topk, 2*ffn] bf16, probs fp32 -> FP8 rows of out (fc2's input).
                        Unfused: chunk, silu, mul, mul by probs, cast (megatron's weighted SwiGLU,
                        eager), then the eager blockwise quantisation.
  swiglu_fwd_columns    the same -> FP8 columns of out (a recompute in backward, for fc2's wgrad).
  swiglu_bwd            grad_out, h, probs -> FP8 rows and columns of grad_h (fc1's dgrad and
                        wgrad inputs) and grad_probs. Unfused: megatron's eager
                        weighted_swiglu_back, then the eager quantisation of grad_h and grad_h^T.
  swiglu_fwd_out, swiglu_bwd_out   the bf16 path (the autograd `swiglu`): out, and grad_h with
                        grad_probs; unfused: the same eager sequences without quantisation.
  rmsnorm_fwd_rows      x [tokens, hidden] -> FP8 rows of y (+ rstd). Unfused: the model's RMSNorm
                        (weight * rms_normalize(x)), then the eager quantisation.
  rmsnorm_fwd_out_rows  -> bf16 y and its FP8 rows.
  rmsnorm_fwd_columns   saved rstd -> FP8 columns of y (a recompute in backward).
  rmsnorm_bwd           grad_y, x, weight, rstd -> dx, dweight. Unfused: autograd through the
                        model's RMSNorm.
The eager quantisation (amax over 1x128 groups, divide, clamp, cast, K-block-major scales) is
`eager_quantize_rows` below; columns quantise the transposed copy. Before timing, every output of
both paths is measured against the reference (kernels/*/reference.py: fp32 math, then
kernels/fp8/reference.py's quantiser); the run exits non-zero after writing the JSON if a fused
output misses its bound. Each entry has two times (benchmarks.common.fused_vs_unfused): as
called (median of triton.testing.do_bench, ms, L2 flushed: Python and launch overheads included)
and GPU time (the kernels' summed durations); its floor is the bytes it must move over the copy
bandwidth measured in the same run. Target: fused >= 2x unfused in GPU time (linghe: 2.2x for
RMSNorm + quantisation). Writes JSON via benchmarks.common.write_checked_result("fused_mlp_kernels").
"""

import argparse
import dataclasses
import sys

import torch
import torch.nn.functional as F

from benchmarks.common import (copy_bandwidth, fused_vs_unfused, rel_err, sweep_configs,
                               write_checked_result)
from kernels.fp8.reference import quantize_columns_reference, quantize_rows_reference
from kernels.fp8.tensor import AMAX_FLOOR, BLOCK, FP8_DTYPE, FP8_MAX, Fp8Tensor
from kernels.rmsnorm import rms_norm_backward, rms_norm_forward
from kernels.rmsnorm import triton_ops as rmsnorm_ops
from kernels.rmsnorm.reference import rms_norm_reference
from kernels.swiglu import swiglu_backward, swiglu_forward
from kernels.swiglu import triton_ops as swiglu_ops
from kernels.swiglu.reference import (fp8_agreement, swiglu_backward_reference,
                                      swiglu_reference, ulp_distance)

DEVICE = "cuda"
EPS = 1e-6
TARGET_SPEEDUP = 2.0
FP8_BOUNDS = {"equal_bytes": 0.999, "max_step_error": 1 + 1e-5}  # as tests/kernels
SWEEP = {  # launch configurations tried by --sweep (fields of each module's KernelConfig)
    "swiglu": [{}, {"block_m": 32}, {"block_m": 128}, {"warps": 8}, {"columns_warps": 4},
               {"bwd_columns_slab": 32}, {"bwd_columns_slab": 32, "bwd_columns_warps": 4},
               {"bwd_columns_slab": 128, "bwd_columns_warps": 16}, {"bwd_slab": 16},
               {"bwd_slabs": 4}, {"bwd_warps": 8}],
    "rmsnorm": [{}, {"block_m": 8}, {"block_m": 32}, {"warps": 8}, {"columns_warps": 4},
                {"reduce_block": 1024}, {"bwd_block_m": 32}, {"bwd_block_m": 64, "bwd_warps": 8},
                {"bwd_warps": 8}, {"bwd_block_d": 512, "bwd_warps": 8}],
}


# --- the unfused sequences ----------------------------------------------------------------------

def eager_quantize_rows(x: torch.Tensor) -> Fp8Tensor:
    """Blockwise 1x128 quantisation in PyTorch eager; x [R, K] with K % 128 == 0."""
    R, K = x.shape
    groups = x.float().view(R, K // BLOCK, BLOCK)
    scale = groups.abs().amax(-1).clamp_min(AMAX_FLOOR) / FP8_MAX
    data = (groups / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).view(R, K)
    return Fp8Tensor(data, scale.t().contiguous().t(), "block1x128")


def eager_quantize_columns(x: torch.Tensor) -> Fp8Tensor:
    return eager_quantize_rows(x.t().contiguous())


def unfused_swiglu(h, probs):
    """megatron's weighted SwiGLU, eager: (silu(gate) * up * probs).to(h.dtype)."""
    gate, up = torch.chunk(h, 2, -1)
    return (F.silu(gate) * up * probs.unsqueeze(-1)).to(h.dtype)


def unfused_swiglu_back(grad_out, h, probs):
    """megatron's weighted_swiglu_back, eager: (grad_h in h's dtype, grad_probs fp32)."""
    gate, up = torch.chunk(h, 2, -1)
    g = grad_out * probs.unsqueeze(-1)
    sig = torch.sigmoid(gate)
    grad_h = torch.cat((g * sig * (1 + gate * (1 - sig)) * up, g * F.silu(gate)), -1)
    grad_probs = (F.silu(gate) * up * grad_out.to(probs.dtype)).sum(-1)
    return grad_h.to(h.dtype), grad_probs


# --- inputs, accuracy, timing -------------------------------------------------------------------

@dataclasses.dataclass
class Case:
    tokens: int
    topk: int
    ffn: int
    hidden: int

    def inputs(self, seed=0) -> dict:
        g = torch.Generator(device=DEVICE).manual_seed(seed)
        randn = lambda *shape, scale=1.0: scale * torch.randn(*shape, generator=g, device=DEVICE)
        M, F2, d = self.tokens * self.topk, 2 * self.ffn, self.hidden
        # Routing probabilities of top-k rows sum to about routed_scaling_factor (2.5) per token.
        probs = torch.rand(M, generator=g, device=DEVICE) * (2 * 2.5 / self.topk)
        return {"h": randn(M, F2, scale=2.0).bfloat16(), "probs": probs,
                "grad_out": randn(M, self.ffn).bfloat16(),
                "x": randn(self.tokens, d, scale=3.0).bfloat16(),
                "weight": (1 + randn(d, scale=0.2)).bfloat16(),
                "grad_y": randn(self.tokens, d).bfloat16()}

    def floors_bytes(self) -> dict:
        M, Fw, T, d = self.tokens * self.topk, self.ffn, self.tokens, self.hidden
        fp8 = lambda n: n + n // BLOCK * 4  # e4m3 data and its fp32 scales
        return {"swiglu_fwd_rows": 2 * M * 2 * Fw + 4 * M + fp8(M * Fw),
                "swiglu_fwd_columns": 2 * M * 2 * Fw + 4 * M + fp8(M * Fw),
                "swiglu_bwd": 2 * M * Fw + 2 * M * 2 * Fw + 8 * M + 2 * fp8(M * 2 * Fw),
                "swiglu_fwd_out": 2 * M * 2 * Fw + 4 * M + 2 * M * Fw,
                "swiglu_bwd_out": 2 * M * Fw + 2 * (2 * M * 2 * Fw) + 8 * M,
                "rmsnorm_fwd_rows": 2 * T * d + 4 * T + fp8(T * d),
                "rmsnorm_fwd_out_rows": 4 * T * d + 4 * T + fp8(T * d),
                "rmsnorm_fwd_columns": 2 * T * d + 4 * T + fp8(T * d),
                "rmsnorm_bwd": 6 * T * d + 4 * T}


def entries(data: dict) -> dict:
    """name -> (fused, unfused): zero-argument callables returning comparable outputs. Nothing
    but the unfused RMSNorm backward builds an autograd graph (no input requires grad)."""
    h, probs, go = data["h"], data["probs"], data["grad_out"]
    x, w, gy = data["x"], data["weight"], data["grad_y"]
    _, rstd = rms_norm_forward(x, w, EPS, emit=("out",))
    x_leaf = x.detach().requires_grad_(True)
    w_leaf = w.detach().requires_grad_(True)
    y_graph = rms_norm_reference(x_leaf, w_leaf, EPS)

    def fused_swiglu_bwd():
        grads, grad_probs = swiglu_backward(go, h, probs, emit=("rows", "columns"))
        return grads.rows, grads.columns, grad_probs

    def fused_swiglu_bwd_out():
        grads, grad_probs = swiglu_backward(go, h, probs)
        return grads.out, grad_probs

    def unfused_swiglu_bwd():
        grad_h, grad_probs = unfused_swiglu_back(go, h, probs)
        return eager_quantize_rows(grad_h), eager_quantize_columns(grad_h), grad_probs

    def unfused_norm_rows_and_out():
        y = rms_norm_reference(x, w, EPS)
        return y, eager_quantize_rows(y)

    return {
        "swiglu_fwd_rows": (lambda: swiglu_forward(h, probs, emit=("rows",)).rows,
                            lambda: eager_quantize_rows(unfused_swiglu(h, probs))),
        "swiglu_fwd_columns": (lambda: swiglu_forward(h, probs, emit=("columns",)).columns,
                               lambda: eager_quantize_columns(unfused_swiglu(h, probs))),
        "swiglu_bwd": (fused_swiglu_bwd, unfused_swiglu_bwd),
        "swiglu_fwd_out": (lambda: swiglu_forward(h, probs).out, lambda: unfused_swiglu(h, probs)),
        "swiglu_bwd_out": (fused_swiglu_bwd_out, lambda: unfused_swiglu_back(go, h, probs)),
        "rmsnorm_fwd_rows": (lambda: rms_norm_forward(x, w, EPS, emit=("rows",))[0].rows,
                             lambda: eager_quantize_rows(rms_norm_reference(x, w, EPS))),
        "rmsnorm_fwd_out_rows": (lambda: rms_norm_forward(x, w, EPS, emit=("out", "rows"))[0][:2],
                                 unfused_norm_rows_and_out),
        "rmsnorm_fwd_columns": (
            lambda: rms_norm_forward(x, w, EPS, emit=("columns",), rstd=rstd)[0].columns,
            lambda: eager_quantize_columns(rms_norm_reference(x, w, EPS))),
        "rmsnorm_bwd": (lambda: rms_norm_backward(gy, x, w, rstd),
                        lambda: torch.autograd.grad(y_graph, (x_leaf, w_leaf), gy,
                                                    retain_graph=True)),
    }


def fp8_ok(agreement: dict) -> bool:
    return (agreement["equal_bytes"] >= FP8_BOUNDS["equal_bytes"]
            and agreement["max_step_error"] <= FP8_BOUNDS["max_step_error"])


def accuracy(data: dict, runs: dict) -> dict:
    """Per entry, fused and unfused outputs against the reference; `ok`: the fused ones meet the
    test bounds (FP8: FP8_BOUNDS; bf16 out within 1 ulp; gradients 2^-8 relative)."""
    h, probs, go = data["h"], data["probs"], data["grad_out"]
    x, w, gy = data["x"], data["weight"], data["grad_y"]
    swiglu_out = swiglu_reference(h, probs)
    (grad_h, _, _), grad_probs = swiglu_backward_reference(go, h, probs)
    y = rms_norm_reference(x, w, EPS)
    x32, w32 = x.float().requires_grad_(True), w.float().requires_grad_(True)
    dx32, dw32 = torch.autograd.grad(rms_norm_reference(x32, w32, EPS), (x32, w32), gy.float())
    rows = lambda t: quantize_rows_reference(t, "block1x128")
    cols = lambda t: quantize_columns_reference(t, "block1x128")
    measures = {  # entry -> outputs of its callables -> how each is measured
        "swiglu_fwd_rows": lambda r: {"rows": fp8_agreement(r, rows(swiglu_out))},
        "swiglu_fwd_columns": lambda r: {"columns": fp8_agreement(r, cols(swiglu_out))},
        "swiglu_bwd": lambda r: {"rows": fp8_agreement(r[0], rows(grad_h)),
                                 "columns": fp8_agreement(r[1], cols(grad_h)),
                                 "grad_probs_rel_err": rel_err(r[2], grad_probs)},
        "swiglu_fwd_out": lambda r: {"out_max_ulps": ulp_distance(r, swiglu_out).max().item()},
        "swiglu_bwd_out": lambda r: {"out_max_ulps": ulp_distance(r[0], grad_h).max().item(),
                                     "grad_probs_rel_err": rel_err(r[1], grad_probs)},
        "rmsnorm_fwd_rows": lambda r: {"rows": fp8_agreement(r, rows(y))},
        "rmsnorm_fwd_out_rows": lambda r: {"out_max_ulps": ulp_distance(r[0], y).max().item(),
                                           "rows": fp8_agreement(r[1], rows(y))},
        "rmsnorm_fwd_columns": lambda r: {"columns": fp8_agreement(r, cols(y))},
        "rmsnorm_bwd": lambda r: {"dx_rel_err_vs_fp32": rel_err(r[0].float(), dx32),
                                  "dweight_rel_err_vs_fp32": rel_err(r[1].float(), dw32)},
    }
    result = {}
    for name, (fused, unfused) in runs.items():
        entry = {"fused": measures[name](fused()), "unfused": measures[name](unfused())}
        f = entry["fused"]
        max_ulps = 2 if name.startswith("rmsnorm") else 1  # as tests/kernels
        entry["ok"] = (all(fp8_ok(v) for v in f.values() if isinstance(v, dict))
                       and f.get("out_max_ulps", 0) <= max_ulps
                       and f.get("grad_probs_rel_err", 0) <= 1e-5
                       and f.get("dx_rel_err_vs_fp32", 0) <= 2 ** -8 + 1e-5
                       and f.get("dweight_rel_err_vs_fp32", 0) <= 2 ** -7)
        result[name] = entry
    return result


def timings(runs: dict, floors: dict, bandwidth: float) -> dict:
    result = {}
    for name, (fused, unfused) in runs.items():
        e = fused_vs_unfused(fused, unfused)
        floor = floors[name] / bandwidth * 1e3
        result[name] = {**e, "floor_ms": floor,
                        "fused_fraction_of_bandwidth": floor / e["fused_gpu_ms"],
                        "meets_target": e["gpu_speedup"] >= TARGET_SPEEDUP}
        print(f"{name:22s} fused {e['fused_ms']:8.4f} ms  unfused {e['unfused_ms']:8.4f} ms  "
              f"speedup {e['speedup']:5.2f}x  | GPU time {e['fused_gpu_ms']:8.4f} / "
              f"{e['unfused_gpu_ms']:8.4f} ms  {e['gpu_speedup']:5.2f}x  floor {floor:7.4f} ms "
              f"({floor / e['fused_gpu_ms']:4.0%} of copy bandwidth)", flush=True)
    return result


def sweep(runs: dict) -> list:
    """Fused timings under each launch configuration of SWEEP."""
    rows = []
    for kernel, module in (("swiglu", swiglu_ops), ("rmsnorm", rmsnorm_ops)):
        rows += sweep_configs(module, kernel, SWEEP[kernel], runs)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--topk", type=int, default=8, help="routed experts per token")
    p.add_argument("--ffn", type=int, default=512, help="moe_intermediate_size (F)")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--sweep", action="store_true", help="also time launch configurations")
    args = p.parse_args()
    case = Case(args.tokens, args.topk, args.ffn, args.hidden)
    if case.ffn % BLOCK or case.hidden % BLOCK or case.tokens % BLOCK:
        sys.exit(f"tokens, ffn and hidden must be multiples of {BLOCK} (the eager quantiser's "
                 "groups)")
    bandwidth = copy_bandwidth(DEVICE)
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    data = case.inputs()
    runs = entries(data)
    acc = accuracy(data, runs)
    for name, entry in acc.items():
        print(f"accuracy {name}: ok={entry['ok']} fused={entry['fused']} "
              f"unfused={entry['unfused']}", flush=True)
    payload = {
        "case": dataclasses.asdict(case),
        "copy_bandwidth_TBps": bandwidth / 1e12,
        "configs": {"swiglu": dataclasses.asdict(swiglu_ops.CONFIG),
                    "rmsnorm": dataclasses.asdict(rmsnorm_ops.CONFIG)},
        "target_speedup": TARGET_SPEEDUP,
        "accuracy": acc,
        "timings": timings(runs, case.floors_bytes(), bandwidth),
        "sweep": sweep(runs) if args.sweep else [],
    }
    write_checked_result("fused_mlp_kernels", payload, all(e["ok"] for e in acc.values()))


if __name__ == "__main__":
    main()
