"""FP8 MLP speed: our fp8_linear (tensorwise, rowwise, blockwise) against bf16 and torchao float8.

    python -m benchmarks.fp8_mlp [--tokens 16384] [--dim 4096] [--hidden 16384] [--no-torchao]

The MLP of torchao's float8 benchmark: two bias-free linears dim -> hidden -> dim, no activation,
on `tokens` tokens in bf16, timed forward + backward (a fixed random output gradient; x, W1, W2
all get gradients; .grad reset after each run) with triton.testing.do_bench (median ms), in
`rounds` interleaved rounds (each times every row once; a row's time is its median round). Rows:
  bf16                    eager nn.functional.linear
  ours/<recipe>           fp8_linear with a weight cache (weights unchanged between runs, as in
                          the micro-batches of one gradient-accumulation step: every run hits)
  ours/<recipe>/no-cache  fp8_linear quantising the weights on every call
                          (tensorwise_delayed: each layer keeps its DelayedScaling across runs)
  ours/<recipe>/pair      fp8_linear_pair (PAIR_RECIPES) with a weight cache: the same two layers,
                          the product between them (h, and dh in backward) quantised in the
                          epilogue of the Triton GEMM that makes it (kernels/fp8/triton_gemm.py)
  torchao/tensorwise      torchao.float8.convert_to_float8_training, then torch.compile
Before timing, each row's output and gradients (of its second run, so that delayed scaling takes
its scales from a history) are compared with an fp32 MLP on the same (bf16-valued) inputs.
Also times: each FP8 GEMM recipe alone at the MLP's three GEMM shapes, with the Triton tensorwise
GEMM beside cuBLAS; at h's shape, the Triton GEMM's quantising epilogue against cuBLAS + the
delayed quantiser under each launch configuration of EPILOGUE_CONFIGS; our quantisers at the
MLP's activation shapes (bytes moved / time). Probes whether cuBLAS's blockwise GEMM needs the M
padding fp8_gemm applies. Writes JSON through benchmarks.common.write_result("fp8_mlp", ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics

import torch
import torch.nn.functional as F
from triton.runtime.errors import OutOfResources

from benchmarks.common import launch_config, median_ms, rel_err, version, write_result
from kernels.fp8 import gemm as fp8_gemm_module
from kernels.fp8 import triton_gemm
from kernels.fp8.amax_history import AmaxHistory
from kernels.fp8 import quantize as quantize_module
from kernels.fp8.gemm import fp8_gemm
from kernels.fp8.linear import RECIPES, DelayedScaling, Fp8WeightCache, fp8_linear
from kernels.fp8.linear_pair import PAIR_RECIPES, fp8_linear_pair
from kernels.fp8.reference import fp8_gemm_reference
from kernels.fp8.quantize import (quantize_columns, quantize_rows, quantize_rows_and_columns,
                                  quantize_weight)

DEVICE = "cuda"  # a CPU smoke run (TRITON_INTERPRET=1, tiny shapes) may replace it and the timer
# (block_m, block_n, block_k, stages, warps) of the Triton GEMM swept at h's shape; the first is
# triton_gemm's default.
EPILOGUE_CONFIGS = [(128, 256, 128, 3, 8), (256, 128, 128, 3, 8), (128, 256, 64, 5, 8),
                    (128, 256, 64, 4, 8), (128, 128, 128, 4, 4)]


def timer(fn) -> float:
    return median_ms(fn)


def make_inputs(tokens, dim, hidden):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(tokens, dim, device=DEVICE, generator=g).bfloat16()
    w1 = (torch.randn(hidden, dim, device=DEVICE, generator=g) * dim ** -0.5).bfloat16()
    w2 = (torch.randn(dim, hidden, device=DEVICE, generator=g) * hidden ** -0.5).bfloat16()
    dy = torch.randn(tokens, dim, device=DEVICE, generator=g).bfloat16()
    return x, w1, w2, dy


def reference(x, w1, w2, dy) -> list:
    """fp32 output and gradients (x, W1, W2) of the MLP on the same values."""
    leaves = [t.detach().float().requires_grad_(True) for t in (x, w1, w2)]
    out = F.linear(F.linear(leaves[0], leaves[1]), leaves[2])
    out.backward(dy.float())
    return [out.detach()] + [t.grad for t in leaves]


def mlp_fn(kind: str):
    """forward(x, w1, w2) for a row name."""
    if kind == "bf16":
        return lambda x, w1, w2: F.linear(F.linear(x, w1), w2)
    recipe = kind.split("/")[1]
    cache = None if kind.endswith("no-cache") else Fp8WeightCache()
    d1, d2 = DelayedScaling.for_recipe(recipe), DelayedScaling.for_recipe(recipe)  # per layer
    if kind.endswith("/pair"):
        return lambda x, w1, w2: fp8_linear_pair(x, w1, w2, recipe, cache, d1, d2)
    return lambda x, w1, w2: fp8_linear(fp8_linear(x, w1, recipe, cache, d1), w2, recipe, cache,
                                        d2)


def torchao_module(w1, w2):
    """(compiled torchao float8 MLP, its version) or (None, reason)."""
    try:
        import torchao
        from torchao.float8 import convert_to_float8_training
    except Exception as e:  # noqa: BLE001 - any import failure means: skip with the reason
        return None, f"torchao unavailable: {type(e).__name__}: {e}"
    mlp = torch.nn.Sequential(torch.nn.Linear(w1.shape[1], w1.shape[0], bias=False),
                              torch.nn.Linear(w2.shape[1], w2.shape[0], bias=False))
    mlp = mlp.to(device=DEVICE, dtype=torch.bfloat16)
    with torch.no_grad():
        mlp[0].weight.copy_(w1)
        mlp[1].weight.copy_(w2)
    convert_to_float8_training(mlp)  # default config: tensorwise dynamic scaling
    return torch.compile(mlp), getattr(torchao, "__version__", version("torchao"))


def fwd_bwd_step(forward, leaves, dy):
    """One timed run: forward + backward, then fresh gradients (no accumulation kernels timed)."""
    def step():
        forward().backward(dy)
        for t in leaves:
            t.grad = None

    return step


def accuracy(out, grads, ref) -> dict:
    return {n: rel_err(a, b) for n, a, b in zip(("out", "dx", "dw1", "dw2"), [out] + grads, ref)}


def bench_mlp(tokens, dim, hidden, with_torchao: bool, rounds: int) -> dict:
    """Every row's accuracy, then its time: the median over `rounds` rounds, each of which times
    every row once in turn (so clock and thermal drift during the run reach all rows alike)."""
    x, w1, w2, dy = make_inputs(tokens, dim, hidden)
    ref = reference(x, w1, w2, dy)
    flops = 3 * 2 * 2 * tokens * dim * hidden  # 2 linears x (fwd, dgrad, wgrad)
    steps, rows, notes = {}, {}, {}
    kinds = (["bf16"] + [f"ours/{r}" for r in RECIPES] + [f"ours/{r}/no-cache" for r in RECIPES]
             + [f"ours/{r}/pair" for r in PAIR_RECIPES])
    for kind in kinds:
        fn = mlp_fn(kind)
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, w1, w2)]
        for _ in range(2):  # the second run: delayed scales come from the first run's amaxes
            for t in leaves:
                t.grad = None
            out = fn(*leaves)
            out.backward(dy)
        rows[kind] = {"accuracy_rel_err": accuracy(out, [t.grad for t in leaves], ref)}
        for t in leaves:
            t.grad = None
        del out
        steps[kind] = fwd_bwd_step(lambda fn=fn, leaves=leaves: fn(*leaves), leaves, dy)
    if with_torchao:
        mlp, info = torchao_module(w1, w2)
        if mlp is None:
            notes["torchao"] = info
            print(f"torchao skipped: {info}", flush=True)
        else:
            xt = x.detach().clone().requires_grad_(True)
            out = mlp(xt)
            out.backward(dy)
            grads = [xt.grad, mlp._orig_mod[0].weight.grad, mlp._orig_mod[1].weight.grad]
            rows["torchao/tensorwise"] = {"accuracy_rel_err": accuracy(out, grads, ref),
                                          "torchao": info}
            params = [xt] + list(mlp.parameters())
            for t in params:
                t.grad = None
            del out, grads
            steps["torchao/tensorwise"] = fwd_bwd_step(lambda: mlp(xt), params, dy)
    for step in steps.values():  # compile / autotune / cache fill / history fill, untimed
        for _ in range(3):
            step()
    torch.cuda.empty_cache()
    for _ in range(rounds):
        for kind, step in steps.items():
            rows[kind].setdefault("round_ms", []).append(timer(step))
    for kind, r in rows.items():
        r["ms"] = statistics.median(r["round_ms"])
        print(f"{kind:28s} {r['ms']:8.3f} ms  rounds {[round(v, 2) for v in r['round_ms']]}  "
              f"{json.dumps({k: round(v, 4) for k, v in r['accuracy_rel_err'].items()})}",
              flush=True)
    base = rows["bf16"]["ms"]
    for r in rows.values():
        r["speedup_vs_bf16"] = base / r["ms"]
        r["tflops"] = flops / (r["ms"] * 1e-3) / 1e12
    return {"rows": rows, "notes": notes, "flops": flops, "rounds": rounds}


def bench_gemms(tokens, dim, hidden) -> list[dict]:
    """Each GEMM recipe alone at the MLP's GEMM shapes (M, K, N of a [M, K] @ b[N, K]^T)."""
    shapes = {"fc1 fwd, fc2 dgrad": (tokens, dim, hidden),
              "fc2 fwd, fc1 dgrad, fc1 wgrad": (tokens, hidden, dim),
              "fc2 wgrad": (dim, tokens, hidden)}
    out = []
    for name, (M, K, N) in shapes.items():
        a = torch.randn(M, K, device=DEVICE).bfloat16()
        b = torch.randn(N, K, device=DEVICE).bfloat16()
        flops = 2 * M * K * N
        row = {"gemm": name, "M": M, "K": K, "N": N}
        row["bf16_mm"] = timer(lambda: a @ b.t())
        qa, qb = quantize_rows(a, "tensor"), quantize_rows(b, "tensor")
        row["tensorwise"] = timer(lambda: fp8_gemm(qa, qb))
        row["tensorwise_fast_accum"] = timer(lambda: fp8_gemm(qa, qb, use_fast_accum=True))
        row["tensorwise_triton"] = timer(lambda: triton_gemm.fp8_gemm_triton(qa, qb))
        row["tensorwise_triton_fast_accum"] = timer(
            lambda: triton_gemm.fp8_gemm_triton(qa, qb, use_fast_accum=True))
        qa, qb = quantize_rows(a, "row"), quantize_rows(b, "row")
        row["rowwise"] = timer(lambda: fp8_gemm(qa, qb))
        row["rowwise_fast_accum"] = timer(lambda: fp8_gemm(qa, qb, use_fast_accum=True))
        qa = quantize_rows(a, "block1x128")
        qw, qb = quantize_weight(b, "block128x128"), quantize_rows(b, "block1x128")
        row["block_1x128_128x128"] = timer(lambda: fp8_gemm(qa, qw))
        row["block_1x128_1x128"] = timer(lambda: fp8_gemm(qa, qb))
        for k in [k for k in row if k not in ("gemm", "M", "K", "N")]:
            row[f"{k}_tflops"] = flops / (row[k] * 1e-3) / 1e12
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v)
                          for k, v in row.items()}), flush=True)
        out.append(row)
        del a, b, qa, qb, qw
    return out


def bench_quantizing_epilogue(tokens, dim, hidden) -> list[dict]:
    """At h's shape (x [tokens, dim] @ W1^T -> [tokens, hidden]): the product's rows and columns
    FP8 forms from the Triton GEMM's quantising epilogue, against cuBLAS's bf16 GEMM followed by
    the delayed quantiser (what fp8_linear runs), with fast accumulation under each launch
    configuration of EPILOGUE_CONFIGS, and with precise accumulation under the default one (the
    plain Triton GEMM timed beside)."""
    a = quantize_rows(torch.randn(tokens, dim, device=DEVICE).bfloat16(), "tensor")
    b = quantize_rows((torch.randn(hidden, dim, device=DEVICE) * dim ** -0.5).bfloat16(),
                      "tensor")
    fused_history, unfused_history = AmaxHistory(), AmaxHistory()
    triton_gemm.fp8_gemm_quantized(a, b, fused_history)  # bootstrapped: the fused path runs
    unfused = {fast: timer(lambda: quantize_rows_and_columns(
        fp8_gemm(a, b, use_fast_accum=fast), "tensor", unfused_history)) for fast in (True, False)}
    out = []
    runs = [(True, c) for c in EPILOGUE_CONFIGS] + [(False, EPILOGUE_CONFIGS[0])]
    for fast, (bm, bn, bk, stages, warps) in runs:
        with launch_config(triton_gemm, block_m=bm, block_n=bn, block_k=bk, stages=stages,
                           warps=warps) as cfg:
            row = {"fast_accum": fast, "config": dataclasses.asdict(cfg),
                   "unfused_ms": unfused[fast]}
            try:
                row["gemm_ms"] = timer(lambda: triton_gemm.fp8_gemm_triton(
                    a, b, use_fast_accum=fast))
                row["fused_ms"] = timer(lambda: triton_gemm.fp8_gemm_quantized(
                    a, b, fused_history, use_fast_accum=fast))
                row["speedup"] = row["unfused_ms"] / row["fused_ms"]
            except OutOfResources as e:  # a tile too large for this GPU's shared memory
                row["error"] = str(e)
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def bench_quantisers(tokens, dim, hidden) -> list[dict]:
    """Our quantisers on the MLP's activations: (bf16 bytes read once + FP8 bytes written) over
    time, at each warp count of the tile kernels (quantize.TILE_WARPS; results do not depend
    on it). tensor_delayed: tensor scaling from an amax history (one read instead of two)."""
    out = []
    default = quantize_module.TILE_WARPS
    try:
        for name, (M, K) in {"x / dy": (tokens, dim), "h / dh": (tokens, hidden)}.items():
            x = torch.randn(M, K, device=DEVICE).bfloat16()
            for warps in (4, 8):
                quantize_module.TILE_WARPS = warps
                for scaling in ("tensor", "tensor_delayed", "row", "block1x128"):
                    history = AmaxHistory() if scaling == "tensor_delayed" else None
                    for form, fn, written in (("rows", quantize_rows, 1),
                                              ("columns", quantize_columns, 1),
                                              ("rows_and_columns", quantize_rows_and_columns, 2)):
                        ms = timer(lambda: fn(x, scaling.split("_")[0], history))
                        moved = M * K * (2 + written)
                        out.append({"tensor": name, "M": M, "K": K, "scaling": scaling,
                                    "form": form, "tile_warps": warps, "ms": ms,
                                    "GBps": moved / (ms * 1e-3) / 1e9})
                        print(json.dumps(out[-1]), flush=True)
            del x
    finally:
        quantize_module.TILE_WARPS = default
    return out


def probe_blockwise_unaligned_m() -> str:
    """Does cuBLAS's 1x128 x 128x128 GEMM take an M that is not a multiple of 4 (scale_a's leading
    dim) without padding? fp8_gemm pads to gemm.BLOCKWISE_M_ALIGN; this says if it must."""
    M, K, N = 4001, 2048, 1536
    a = quantize_rows(torch.randn(M, K, device=DEVICE).bfloat16(), "block1x128")
    b = quantize_weight(torch.randn(N, K, device=DEVICE).bfloat16(), "block128x128")
    try:
        st = F.ScalingType
        out = F.scaled_mm(a.data, b.data.t(), a.scale, st.BlockWise1x128,
                          fp8_gemm_module._block128_scale_b(b.scale), st.BlockWise128x128,
                          output_dtype=torch.bfloat16)
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - the probe reports whatever cuBLAS says
        return f"M={M} unpadded raises: {type(e).__name__}: {str(e)[:300]}"
    err = rel_err(out, fp8_gemm_reference(a, b, torch.float32))
    return (f"M={M} unpadded works (rel err {err:.1e}): padding unneeded" if err < 1e-2 else
            f"M={M} unpadded is silently wrong (rel err {err:.2f}): padding needed")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=16384)
    p.add_argument("--no-torchao", action="store_true")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    T, D, H = args.tokens, args.dim, args.hidden
    print(f"{torch.cuda.get_device_name()}: MLP {D} -> {H} -> {D}, {T} tokens; fp8_gemm "
          f"recipes {fp8_gemm_module.GEMMS}", flush=True)
    mlp = bench_mlp(T, D, H, not args.no_torchao, args.rounds)
    gemms = bench_gemms(T, D, H)
    epilogue = bench_quantizing_epilogue(T, D, H)
    quant = bench_quantisers(T, D, H)
    probe = probe_blockwise_unaligned_m()
    print(f"blockwise unaligned M probe: {probe}", flush=True)
    payload = {
        "shape": {"tokens": T, "dim": D, "hidden": H},
        "torchao_version": version("torchao"),
        "mlp_fwd_bwd": mlp, "gemms_ms": gemms, "quantizing_epilogue": epilogue,
        "quantisers": quant,
        "blockwise_unaligned_m_probe": probe,
    }
    path = write_result("fp8_mlp", payload)
    print("\n| row | ms | speedup vs bf16 | TFLOP/s | rel err out / dx / dW1 / dW2 |")
    print("|---|---|---|---|---|")
    for kind, r in mlp["rows"].items():
        acc = " / ".join(f"{v:.4f}" for v in r["accuracy_rel_err"].values())
        print(f"| {kind} | {r['ms']:.3f} | {r['speedup_vs_bf16']:.2f}x | {r['tflops']:.0f} | "
              f"{acc} |")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
