"""Lightning attention speed: ours (Triton), fla-core chunk_simple_gla, SDPA flash (causal, GQA).

    python -m benchmarks.lightning_attention [--shapes 8x4096,1x32768,1x131072] [--heads 16]
        [--dim 128] [--kv-heads 4] [--accuracy-log LOG] [--sweep] [--out benchmarks/results]

Times the forward and forward+backward (bf16) with triton.testing.do_bench (median, ms) and prints
the memory-traffic floor beside each: the forward must read q, k, v and write o (4 tensors of
T*B*H*D bf16), forward+backward must in addition read do and write dq, dk, dv (8 tensors in all),
over the copy bandwidth measured in the same run. Before timing, each shape's outputs and
gradients are checked against the fp32 PyTorch reference. Writes JSON (device, versions, date,
results, accuracy, and the text of --accuracy-log, e.g. the GPU test log) and a markdown table to
--out. --sweep also times our kernels under several launch configurations.
"""

import argparse
import dataclasses
import datetime
import json
import pathlib

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from benchmarks.common import rel_err, version
from kernels.lightning_attention import triton_ops
from kernels.lightning_attention.reference import lightning_attention_chunked
from kernels.lightning_attention.triton_ops import lightning_attention_triton

SWEEP = [  # launch configurations tried by --sweep (fields of triton_ops.KernelConfig)
    {},
    {"bwd_warps": 4, "bwd_block": 32},
    {"waves": 1.0},
    {"waves": 4.0, "min_segment": 512},
]


def model_slopes(H: int, device) -> torch.Tensor:
    """The Ring-linear per-head slopes 2^(-8(h+1)/H) at layer factor 1 (the fastest decays)."""
    return torch.tensor([2 ** (-8 * (h + 1) / H) for h in range(H)], device=device)


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + bytes written)."""
    x = torch.empty(2 ** 30, dtype=torch.uint8, device="cuda").random_(0, 255)
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=50, rep=200, return_mode="median")
    return 2 * x.numel() / (ms * 1e-3)


def accuracy(B, T, H, D, slope) -> dict:
    """Our and fla's outputs, final states and gradients vs the fp32 reference, on one input."""
    g = torch.Generator(device="cuda").manual_seed(T + B)
    q, k, v, do = (torch.randn(T, B, H, D, generator=g, device="cuda").bfloat16()
                   for _ in range(4))
    h0 = torch.randn(B, H, D, D, generator=g, device="cuda")
    dht = torch.randn(B, H, D, D, generator=g, device="cuda")

    def run(fn, dtype):
        leaves = [x.detach().to(dtype, copy=True).requires_grad_(True) for x in (q, k, v)]
        h = h0.clone().requires_grad_(True)
        o, ht = fn(*leaves, slope, initial_state=h, output_final_state=True)
        ((o.float() * do.float()).sum() + (ht * dht).sum()).backward()
        return [o, ht] + [x.grad for x in leaves] + [h.grad]

    ref = run(lightning_attention_chunked, torch.float32)
    names = ["o", "final_state", "dq", "dk", "dv", "d_initial_state"]
    out = {"ours": dict(zip(names, (rel_err(a.float(), b) for a, b in
                                    zip(run(lightning_attention_triton, torch.bfloat16), ref))))}
    fla = fla_function()
    if fla is not None:
        def fla_call(q, k, v, slope, initial_state, output_final_state):
            o, ht = fla(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                        g_gamma=-slope, initial_state=initial_state,
                        output_final_state=output_final_state)
            return o.transpose(0, 1), ht
        out["fla"] = dict(zip(names, (rel_err(a.float(), b) for a, b in
                                      zip(run(fla_call, torch.bfloat16), ref))))
    return out


def fla_function():
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except ImportError:
        return None
    return chunk_simple_gla


def bench_pair(fwd, inputs, do) -> tuple[float, float]:
    """Median ms of the forward alone (no autograd) and of forward + backward."""
    with torch.no_grad():
        t_fwd = do_bench(fwd, return_mode="median")

    def step():
        out = fwd()
        (out[0] if isinstance(out, tuple) else out).backward(do)

    return t_fwd, do_bench(step, grad_to_none=inputs, return_mode="median")


def bench_shape(B, T, H, D, kv_heads, slope, bandwidth, with_peers=True) -> dict:
    dev = "cuda"
    tensor_bytes = T * B * H * D * 2
    row = {"B": B, "T": T, "H": H, "D": D,
           "floor_fwd_ms": 4 * tensor_bytes / bandwidth * 1e3,
           "floor_fwd_bwd_ms": 8 * tensor_bytes / bandwidth * 1e3}
    q, k, v, do = (torch.randn(T, B, H, D, device=dev, dtype=torch.bfloat16) for _ in range(4))
    for x in (q, k, v):
        x.requires_grad_(True)
    row["ours_fwd_ms"], row["ours_fwd_bwd_ms"] = bench_pair(
        lambda: lightning_attention_triton(q, k, v, slope), [q, k, v], do)
    if not with_peers:
        return row
    fla = fla_function()
    if fla is not None:  # fla's own layout [B, T, H, D], so no transposes are timed
        qf, kf, vf, dof = (torch.randn(B, T, H, D, device=dev, dtype=torch.bfloat16)
                           for _ in range(4))
        for x in (qf, kf, vf):
            x.requires_grad_(True)
        row["fla_fwd_ms"], row["fla_fwd_bwd_ms"] = bench_pair(
            lambda: fla(qf, kf, vf, g_gamma=-slope), [qf, kf, vf], dof)
    qs = torch.randn(B, H, T, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    ks, vs = (torch.randn(B, kv_heads, T, D, device=dev, dtype=torch.bfloat16,
                          requires_grad=True) for _ in range(2))
    dos = torch.randn(B, H, T, D, device=dev, dtype=torch.bfloat16)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
        row["sdpa_fwd_ms"], row["sdpa_fwd_bwd_ms"] = bench_pair(
            lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True),
            [qs, ks, vs], dos)
    return row


def sweep(shapes, H, D, slope, bandwidth) -> list[dict]:
    rows = []
    default = triton_ops.CONFIG
    try:
        for overrides in SWEEP:
            triton_ops.CONFIG = dataclasses.replace(default, **overrides)
            for B, T in shapes:
                row = bench_shape(B, T, H, D, 0, slope, bandwidth, with_peers=False)
                row["config"] = overrides
                rows.append(row)
                print(f"sweep {overrides} B={B} T={T}: fwd {row['ours_fwd_ms']:.3f} ms, "
                      f"fwd+bwd {row['ours_fwd_bwd_ms']:.3f} ms", flush=True)
    finally:
        triton_ops.CONFIG = default
    return rows


def markdown(rows, device) -> str:
    lines = [f"Lightning attention, bf16, H={rows[0]['H']}, D={rows[0]['D']}, {device}; "
             "median ms (triton.testing.do_bench). SDPA: flash, causal, GQA 16/4 heads.", "",
             "| shape | pass | ours | fla-core | SDPA flash | floor | fla / ours |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        for name, key in (("fwd", "fwd_ms"), ("fwd+bwd", "fwd_bwd_ms")):
            ours, fla, sdpa = r[f"ours_{key}"], r.get(f"fla_{key}"), r.get(f"sdpa_{key}")
            fmt = lambda x: "-" if x is None else f"{x:.3f}"
            speedup = "-" if fla is None else f"{fla / ours:.2f}x"
            lines.append(f"| B={r['B']} x T={r['T']} | {name} | {fmt(ours)} | {fmt(fla)} | "
                         f"{fmt(sdpa)} | {fmt(r['floor_' + key])} | {speedup} |")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="8x4096,1x32768,1x131072", help="BxT,BxT,...")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4, help="SDPA key/value heads (GQA)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--accuracy-log", type=pathlib.Path, help="a test log to store with the results")
    p.add_argument("--sweep", action="store_true", help="also time launch configurations")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/results"))
    args = p.parse_args()
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    H, D = args.heads, args.dim
    slope = model_slopes(H, "cuda")
    device = torch.cuda.get_device_name()
    bandwidth = copy_bandwidth()
    print(f"{device}: copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)

    acc = {f"{B}x{T}": accuracy(B, T, H, D, slope) for B, T in shapes}
    print(json.dumps(acc, indent=1), flush=True)
    sweep_rows = sweep(shapes, H, D, slope, bandwidth) if args.sweep else []
    rows = []
    for B, T in shapes:
        rows.append(bench_shape(B, T, H, D, args.kv_heads, slope, bandwidth))
        print(json.dumps(rows[-1]), flush=True)

    table = markdown(rows, device)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    result = {
        "device": device, "date": stamp, "copy_bandwidth_TBps": bandwidth / 1e12,
        "versions": {p: version(p) for p in ("torch", "triton", "fla-core")},
        "config": dataclasses.asdict(triton_ops.CONFIG), "accuracy_vs_fp32_reference": acc,
        "results": rows, "sweep": sweep_rows,
        "accuracy_log": args.accuracy_log.read_text() if args.accuracy_log else None,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"lightning_attention_{stamp}.json").write_text(json.dumps(result, indent=1))
    (args.out / f"lightning_attention_{stamp}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
