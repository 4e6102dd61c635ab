"""The lightning layer's fused kernels against the unfused PyTorch sequences they replace (bf16).

    python -m benchmarks.attention_kernels [--shapes 8192x1,4096x2] [--heads 16] [--dim 128]
        [--rotary 0.5] [--groups 4] [--silu] [--sweep]

Entries, each forward (no autograd) and backward (autograd.grad of the outputs, graph kept):
  split_norm_rope  qkvg [s, b, H*4*D] -> q, k, v, gate. Unfused: the layer's code (view/unbind,
                   SiLU if --silu, `rms_normalize` * weight, megatron-core's bshd RoPE).
  gated_norm       o, gate -> GroupedRMSNorm(o) * sigmoid(gate), gate a strided slice of qkvg.
  layer_core       split -> lightning attention (Triton, both ways) -> gated norm: what the
                   layer runs between its two projections, forward and forward + backward; the
                   fused path also hands the attention contiguous q, k, v.
Before any timing, outputs and gradients of both paths are measured against fp32 autograd
through the reference on the same inputs; the fused error must not exceed the unfused one by
more than ACCURACY_FACTOR (else the run stops after writing the accuracy). Times: as called
(medians of triton.testing.do_bench, ms) and GPU time (the kernels' summed durations,
benchmarks.common.gpu_ms); each kernel's floor is the bytes it must move over the copy
bandwidth measured in the same run. Writes JSON via benchmarks.common.write_result.
"""

import argparse
import dataclasses
import functools
import sys

import torch
from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

from benchmarks.common import (copy_bandwidth, gpu_ms, launch_config, median_ms, rel_err,
                               write_result)
from kernels.gated_norm import triton_ops as gated_ops
from kernels.gated_norm.reference import gated_group_rms_norm_reference
from kernels.gated_norm.triton_ops import gated_group_rms_norm_triton
from kernels.lightning_attention.triton_ops import lightning_attention_triton
from kernels.qk_norm_rope import triton_ops as split_ops
from kernels.qk_norm_rope.reference import qkvg_split_norm_rope_reference
from kernels.qk_norm_rope.triton_ops import qkvg_split_norm_rope_triton
from ring_train.model.norms import rms_normalize

DEVICE = "cuda"
EPS = 1e-6
ACCURACY_FACTOR = 1.5
SWEEP = {  # launch configurations tried by --sweep (fields of each module's KernelConfig)
    "split_norm_rope": [{}, {"fwd_block_t": 8}, {"fwd_block_t": 32, "fwd_warps": 8},
                        {"bwd_block_t": 8}, {"bwd_block_t": 32, "bwd_warps": 8},
                        {"bwd_programs": 512}],
    "gated_norm": [{}, {"fwd_elements": 2048, "fwd_warps": 4}, {"fwd_elements": 4096,
                   "fwd_warps": 8}, {"bwd_elements": 512}, {"bwd_elements": 2048, "bwd_warps": 8},
                   {"bwd_programs": 1024}],
}


# --- the unfused sequences: LightningAttention.forward with fused_kernels off ------------------

def unfused_split(qkvg, q_weight, k_weight, freqs, *, eps, silu):
    s, b, width = qkvg.shape
    D = q_weight.numel()
    q, k, v, gate = qkvg.view(s, b, width // (4 * D), 4, D).unbind(dim=3)
    if silu:
        q, k, v = (torch.nn.functional.silu(x) for x in (q, k, v))
    q, k = q_weight * rms_normalize(q, eps), k_weight * rms_normalize(k, eps)
    # what megatron-core's apply_rotary_pos_emb runs for the layer's config (no fusion, bshd)
    q = _apply_rotary_pos_emb_bshd(q, freqs, rotary_interleaved=False)
    k = _apply_rotary_pos_emb_bshd(k, freqs, rotary_interleaved=False)
    return q, k, v, gate


def layer_core(split, gated_norm, qkvg, q_weight, k_weight, out_weight, freqs, slope, groups,
               silu):
    q, k, v, gate = split(qkvg, q_weight, k_weight, freqs, eps=EPS, silu=silu)
    o, _ = lightning_attention_triton(q, k, v, slope)
    return gated_norm(o, gate, out_weight, groups, EPS)


PATHS = {
    "split_norm_rope": (qkvg_split_norm_rope_triton, unfused_split),
    "gated_norm": (gated_group_rms_norm_triton, gated_group_rms_norm_reference),
}


# --- inputs, accuracy, timing -------------------------------------------------------------------

@dataclasses.dataclass
class Case:
    s: int
    b: int
    H: int
    D: int
    rotary: float
    groups: int
    silu: bool

    def inputs(self, seed=0):
        """bf16 leaves and output gradients of each entry, on the GPU."""
        g = torch.Generator(device=DEVICE).manual_seed(seed)
        s, b, H, D = self.s, self.b, self.H, self.D
        bf16 = lambda *shape, scale=1.0, shift=0.0: (
            shift + scale * torch.randn(*shape, generator=g, device=DEVICE)).bfloat16()
        rot = int(D * self.rotary)
        inv_freq = 1.0 / 10000 ** (torch.arange(0, rot, 2, device=DEVICE).float() / rot)
        angles = torch.outer(torch.arange(s, device=DEVICE).float(), inv_freq)
        freqs = torch.cat((angles, angles), -1)[:, None, None, :]  # megatron's rotary_pos_emb
        qkvg = bf16(s, b, H * 4 * D)
        return {
            "split_norm_rope": ((qkvg, bf16(D, scale=0.2, shift=1.0),
                                 bf16(D, scale=0.2, shift=1.0)),
                                dict(freqs=freqs, eps=EPS, silu=self.silu),
                                [bf16(s, b, H, D) for _ in range(4)]),
            "gated_norm": ((bf16(s, b, H, D), qkvg.view(s, b, H, 4, D)[:, :, :, 3],
                            bf16(H * D, scale=0.2, shift=1.0)),
                           dict(groups=self.groups, eps=EPS), [bf16(s, b, H * D)]),
            "freqs": freqs,
            "slope": torch.tensor([2 ** (-8 * (h + 1) / H) for h in range(H)], device=DEVICE),
        }

    def floors_bytes(self) -> dict:
        plane = self.s * self.b * self.H * self.D * 2  # one [s, b, H, D] bf16 tensor
        return {"split_norm_rope": {"fwd": 8 * plane, "bwd": 12 * plane},
                "gated_norm": {"fwd": 3 * plane, "bwd": 5 * plane}}


def call(fn, name, leaves, kwargs):
    if name == "split_norm_rope":
        return fn(*leaves, kwargs["freqs"], eps=kwargs["eps"], silu=kwargs["silu"])
    return (fn(*leaves, kwargs["groups"], kwargs["eps"]),)


def outputs_and_grads(fn, name, leaves, kwargs, grads, dtype):
    xs = [x.detach().to(dtype).requires_grad_(True) for x in leaves]
    outs = call(fn, name, xs, kwargs)
    dxs = torch.autograd.grad(outs, xs, [g.to(dtype) for g in grads])
    return [o.detach() for o in outs] + list(dxs)


def accuracy(case: Case, data: dict) -> dict:
    """Relative errors of the fused and unfused bf16 paths against fp32 autograd through the
    reference, per output and gradient, and whether the fused path is as accurate."""
    references = {"split_norm_rope": qkvg_split_norm_rope_reference,
                  "gated_norm": gated_group_rms_norm_reference}
    result = {}
    for name, (fused, unfused) in PATHS.items():
        leaves, kwargs, grads = data[name]
        truth = outputs_and_grads(references[name], name, leaves, kwargs, grads, torch.float32)
        errs = {path: [rel_err(x.float(), t) for x, t in zip(
                    outputs_and_grads(fn, name, leaves, kwargs, grads, torch.bfloat16), truth)]
                for path, fn in (("fused", fused), ("unfused", unfused))}
        ok = all(f <= ACCURACY_FACTOR * u + 1e-6 for f, u in zip(errs["fused"], errs["unfused"]))
        result[name] = {**errs, "ok": ok}
    return result


def time_entry(fn, name, leaves, kwargs, grads) -> dict:
    """Forward and backward times, as called (median_ms) and on the GPU (gpu_ms)."""
    def forward():
        with torch.no_grad():
            return call(fn, name, leaves, kwargs)

    xs = [x.detach().requires_grad_(True) for x in leaves]  # keeps their layout
    outs = call(fn, name, xs, kwargs)
    backward = lambda: torch.autograd.grad(outs, xs, grads, retain_graph=True)  # noqa: E731
    return {"fwd_ms": median_ms(forward), "bwd_ms": median_ms(backward),
            "fwd_gpu_ms": gpu_ms(forward), "bwd_gpu_ms": gpu_ms(backward)}


def time_layer_core(case: Case, data: dict) -> dict:
    (qkvg, q_w, k_w), _, _ = data["split_norm_rope"]
    out_w = data["gated_norm"][0][2]
    d_out = data["gated_norm"][2][0]
    row = {}
    for path, split, gated in (
            ("fused", qkvg_split_norm_rope_triton, gated_group_rms_norm_triton),
            ("unfused", unfused_split, gated_group_rms_norm_reference)):
        xs = [x.detach().clone().requires_grad_(True) for x in (qkvg, q_w, k_w, out_w)]
        run = functools.partial(layer_core, split, gated, *xs, data["freqs"], data["slope"],
                                case.groups, case.silu)
        with torch.no_grad():
            row[f"{path}_fwd_ms"] = median_ms(run)
        row[f"{path}_fwd_bwd_ms"] = median_ms(lambda: torch.autograd.grad(run(), xs, d_out))
        row[f"{path}_fwd_bwd_gpu_ms"] = gpu_ms(lambda: torch.autograd.grad(run(), xs, d_out))
    row["fwd_speedup"] = row["unfused_fwd_ms"] / row["fused_fwd_ms"]
    row["fwd_bwd_speedup"] = row["unfused_fwd_bwd_ms"] / row["fused_fwd_bwd_ms"]
    row["fwd_bwd_gpu_speedup"] = row["unfused_fwd_bwd_gpu_ms"] / row["fused_fwd_bwd_gpu_ms"]
    return row


def bench_case(case: Case, bandwidth: float) -> dict:
    data = case.inputs()
    row = {"case": dataclasses.asdict(case), "accuracy_vs_fp32": accuracy(case, data)}
    if not all(v["ok"] for v in row["accuracy_vs_fp32"].values()):
        return row
    floors = case.floors_bytes()
    for name, (fused, unfused) in PATHS.items():
        leaves, kwargs, grads = data[name]
        # The unfused layer hands on the gate as a strided slice of qkvg, the fused one as the
        # split kernel's contiguous output.
        fused_leaves = [x.contiguous() for x in leaves]
        entry = {f"fused_{k}": v for k, v in time_entry(fused, name, fused_leaves, kwargs,
                                                         grads).items()}
        entry.update({f"unfused_{k}": v for k, v in time_entry(unfused, name, leaves, kwargs,
                                                                grads).items()})
        for p in ("fwd", "bwd"):
            entry[f"{p}_speedup"] = entry[f"unfused_{p}_ms"] / entry[f"fused_{p}_ms"]
            entry[f"{p}_gpu_speedup"] = entry[f"unfused_{p}_gpu_ms"] / entry[f"fused_{p}_gpu_ms"]
            entry[f"{p}_floor_ms"] = floors[name][p] / bandwidth * 1e3
        row[name] = entry
    row["layer_core"] = time_layer_core(case, data)
    return row


def sweep(case: Case) -> list:
    """Fused timings under each launch configuration of SWEEP."""
    data = case.inputs()
    rows = []
    for name, module in (("split_norm_rope", split_ops), ("gated_norm", gated_ops)):
        for overrides in SWEEP[name]:
            with launch_config(module, **overrides):
                leaves, kwargs, grads = data[name]
                leaves = [x.contiguous() for x in leaves]
                rows.append({"kernel": name, "config": overrides,
                             **time_entry(PATHS[name][0], name, leaves, kwargs, grads)})
            print(rows[-1], flush=True)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="8192x1,4096x2", help="sxb,sxb,... (tokens = s*b)")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--rotary", type=float, default=0.5, help="partial_rotary_factor")
    p.add_argument("--groups", type=int, default=4, help="group_norm_size (per rank)")
    p.add_argument("--silu", action="store_true", help="linear_silu on q, k, v")
    p.add_argument("--sweep", action="store_true", help="also time launch configurations")
    args = p.parse_args()
    cases = [Case(*(int(x) for x in shape.split("x")), args.heads, args.dim, args.rotary,
                  args.groups, args.silu) for shape in args.shapes.split(",")]
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    rows = []
    for case in cases:
        rows.append(bench_case(case, bandwidth))
        print(rows[-1], flush=True)
    payload = {
        "copy_bandwidth_TBps": bandwidth / 1e12,
        "configs": {"split_norm_rope": dataclasses.asdict(split_ops.CONFIG),
                    "gated_norm": dataclasses.asdict(gated_ops.CONFIG)},
        "accuracy_factor": ACCURACY_FACTOR,
        "results": rows,
        "sweep": sweep(cases[0]) if args.sweep else [],
    }
    path = write_result("attention_kernels", payload)
    print(f"wrote {path}")
    for row in rows:
        for name in ("split_norm_rope", "gated_norm"):
            if name in row:
                e = row[name]
                print(f"{row['case']['s']}x{row['case']['b']} {name}: fwd {e['unfused_fwd_ms']:.3f}"
                      f" -> {e['fused_fwd_ms']:.3f} ms ({e['fwd_speedup']:.2f}x, floor "
                      f"{e['fwd_floor_ms']:.3f}); bwd {e['unfused_bwd_ms']:.3f} -> "
                      f"{e['fused_bwd_ms']:.3f} ms ({e['bwd_speedup']:.2f}x, floor "
                      f"{e['bwd_floor_ms']:.3f}) | GPU time: fwd {e['fwd_gpu_speedup']:.2f}x "
                      f"({e['fused_fwd_gpu_ms']:.3f} ms), bwd {e['bwd_gpu_speedup']:.2f}x "
                      f"({e['fused_bwd_gpu_ms']:.3f} ms)")
        if "layer_core" in row:
            e = row["layer_core"]
            print(f"  layer core: fwd {e['fwd_speedup']:.2f}x, fwd+bwd {e['fwd_bwd_speedup']:.2f}x"
                  f" (GPU time {e['fwd_bwd_gpu_speedup']:.2f}x)")
    if not all(v["ok"] for row in rows for v in row["accuracy_vs_fp32"].values()):
        sys.exit("accuracy check failed: no timings for the failing shapes (see the JSON)")


if __name__ == "__main__":
    main()
