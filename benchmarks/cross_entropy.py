"""Vocab-parallel cross-entropy at Ring-mini's shape: ours (kernels/cross_entropy) against
megatron-core's fused (compiled, as training runs it) and unfused ones.

    python -m benchmarks.cross_entropy [--tokens 4096] [--vocab 157184]

bf16 logits [tokens, 1, vocab] (one micro-batch of the mini proxy, TP = 1), forward + backward
with a random loss gradient: time as called (median_ms) and on the GPU (gpu_ms), the memory the
call adds at its peak over the logits and their gradient, and the loss / logit-gradient errors
against torch's fp32 cross-entropy. Writes benchmarks/results/cross_entropy_*.json.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from benchmarks.common import gpu_ms, median_ms, rel_err, write_checked_result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=157184)
    args = p.parse_args()
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy

    from kernels.cross_entropy import vocab_parallel_cross_entropy
    from ring_train.parallel.distributed import destroy_distributed, init_distributed

    init_distributed()
    tp = parallel_state.get_tensor_model_parallel_group()
    g = torch.Generator(device="cuda").manual_seed(0)
    T, V = args.tokens, args.vocab
    logits = (torch.randn(T, 1, V, device="cuda", generator=g) * 3).bfloat16()
    target = torch.randint(0, V, (T, 1), device="cuda", generator=g)
    d_loss = torch.rand(T, 1, device="cuda", generator=g)
    leaf = logits.detach().float().requires_grad_(True)
    ref_loss = F.cross_entropy(leaf.view(T, V), target.view(T), reduction="none").view(T, 1)
    ref_loss.backward(d_loss)
    ref_grad = leaf.grad
    del leaf
    impls = {"ours": lambda x: vocab_parallel_cross_entropy(x, target, tp),
             "megatron_fused": lambda x: fused_vocab_parallel_cross_entropy(x, target, tp),
             "megatron_unfused": lambda x: tensor_parallel.vocab_parallel_cross_entropy(x, target)}
    rows = {}
    x = logits.clone().requires_grad_(True)
    for name, ce in impls.items():
        def step(ce=ce):
            ce(x).backward(d_loss)
            x.grad = None

        for _ in range(3):  # compile (megatron's jit_fuser) and warm up
            step()
        loss = ce(x)
        loss.backward(d_loss)
        row = {"loss_rel_err": rel_err(loss, ref_loss), "grad_rel_err": rel_err(x.grad, ref_grad),
               "grad_dtype": str(x.grad.dtype)}
        x.grad = None
        del loss
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        row["peak_extra_gib"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
        row["ms"] = median_ms(step)
        row["gpu_ms"] = gpu_ms(step)
        rows[name] = row
        shown = {k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()}
        print(f"{name:18s} {json.dumps(shown)}", flush=True)
    for row in rows.values():
        row["speedup_vs_megatron_fused"] = rows["megatron_fused"]["ms"] / row["ms"]
        row["gpu_speedup_vs_megatron_fused"] = rows["megatron_fused"]["gpu_ms"] / row["gpu_ms"]
    destroy_distributed()
    accurate = rows["ours"]["loss_rel_err"] < 1e-5 and rows["ours"]["grad_rel_err"] < 1e-2
    write_checked_result("cross_entropy", {"tokens": T, "vocab": V, "rows": rows}, accurate)


if __name__ == "__main__":
    main()
