"""End-to-end training-step speed on one GPU: the same model under each `compute` setting.

    python -m benchmarks.train_step_throughput [--recipe mini_proxy]
        [--computes reference fused fp8_blockwise ...] [--steps 8] [--warmup 3]
        [--profile-steps 2]

Each compute setting (a preset of recipes/compute/, optionally followed by comma-separated
overrides, e.g. `fp8_blockwise,compute.fp8_routed_experts=false`) runs in its own process (fresh
memory statistics)
with the recipe's first stage: model, DDP, optimizer and megatron's schedule exactly as in
training, on synthetic packed documents (mean length 1K tokens, so the document-masking paths
run as on real data). Records median step time, tokens/s, MFU, peak memory and the losses, and
the speed of each setting relative to the first; with --profile-steps, also how busy the GPU is
and the kernels that take its time. Writes benchmarks/results/train_step_throughput_*.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import write_result
from benchmarks.runs import median_after_warmup, torchrun

MEAN_DOCUMENT_TOKENS = 1024


def synthetic_microbatches(count: int, seq_length: int, micro_batch: int, vocab: int, seed: int):
    """`count` micro-batches of packed random documents (cu_seqlens when micro_batch == 1)."""
    from ring_train.data.microbatch import Microbatch

    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        tokens = torch.randint(0, vocab, (micro_batch, seq_length + 1), generator=generator)
        cu_seqlens = None
        if micro_batch == 1:
            lengths = torch.distributions.Exponential(1.0 / MEAN_DOCUMENT_TOKENS).sample((64,))
            bounds = torch.cumsum(lengths.clamp(min=16).long(), 0)
            bounds = bounds[bounds < seq_length]
            cu_seqlens = torch.cat([torch.tensor([0]), bounds, torch.tensor([seq_length])]).int()
        positions = torch.arange(seq_length).expand(micro_batch, -1).contiguous()
        batches.append(Microbatch(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(),
                                  torch.ones(micro_batch, seq_length), positions, cu_seqlens))
    return batches


def kernel_profile(run_step, steps: int, top: int = 15) -> dict:
    """Where `steps` more training steps spend GPU time (torch.profiler, after the timed steps so
    the timings carry no profiling overhead): wall and summed kernel time per step, their ratio
    (how busy the GPU is; well under 1 means launch- or host-bound), launches per step, and the
    `top` kernels by total time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            run_step()
        torch.cuda.synchronize()
    wall = (time.perf_counter() - started) / steps
    kernels = {}
    for e in prof.key_averages():
        if e.device_type == DeviceType.CUDA and e.device_time_total > 0:
            kernels[e.key] = (e.device_time_total / steps / 1e6, e.count / steps)
    busy = sum(t for t, _ in kernels.values())
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]
    return {"steps": steps, "wall_seconds_per_step": wall, "kernel_seconds_per_step": busy,
            "gpu_busy_fraction": busy / wall,
            "kernel_launches_per_step": sum(c for _, c in kernels.values()),
            "top_kernels": [{"name": k[:160], "seconds_per_step": t, "calls_per_step": c}
                            for k, (t, c) in ranked]}


def measure(recipe: str, compute: str, steps: int, warmup: int, out: Path,
            profile_steps: int = 0) -> None:
    """(Under torchrun, one process.) Trains `warmup + steps` steps (then `profile_steps` profiled
    ones); writes a JSON record."""
    from ring_train.config.hydra import compose_recipe, to_train_config
    from ring_train.model.transformer_config import to_transformer_config
    from ring_train.parallel.distributed import init_distributed, pipeline_comm_kwargs
    from ring_train.training.flops import device_peak_tflops, flops_per_token
    from ring_train.training.setup import build_model_chunks, build_optimizer, wrap_ddp
    from ring_train.training.step import train_step

    preset, *overrides = compute.split(",")
    cfg = to_train_config(compose_recipe([f"recipe={recipe}", f"compute={preset}", *overrides]))
    stage = next(iter(cfg.stages.values()))
    init_distributed(seed=cfg.seed)
    config = to_transformer_config(cfg.model, cfg.parallel, params_dtype=torch.bfloat16,
                                   compute=cfg.compute, **pipeline_comm_kwargs())
    model = wrap_ddp(build_model_chunks(cfg.model, config), config, distributed_optimizer=False)
    optim = dataclasses.replace(cfg.optim, lr=stage.lr)
    optimizer = build_optimizer(model, optim, config, distributed_optimizer=False)
    microbatches = synthetic_microbatches(
        stage.global_batch_size // stage.micro_batch_size, stage.seq_length,
        stage.micro_batch_size, cfg.model.vocab_size, cfg.seed,
    )
    tokens_per_step = stage.global_batch_size * stage.seq_length
    step_seconds, losses = [], []
    synchronize = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup + steps):
        synchronize()
        started = time.perf_counter()
        result = train_step(model, optimizer, microbatches)
        synchronize()
        step_seconds.append(time.perf_counter() - started)
        losses.append(result.loss)
    profiled = (kernel_profile(lambda: train_step(model, optimizer, microbatches), profile_steps)
                if profile_steps and torch.cuda.is_available() else None)
    seconds = median_after_warmup(step_seconds, warmup)
    peak = device_peak_tflops(cfg.logging.peak_tflops)
    tflops = flops_per_token(cfg.model, stage.seq_length) * tokens_per_step / seconds / 1e12
    out.write_text(json.dumps({
        "compute": dataclasses.asdict(cfg.compute),
        "step_seconds": seconds,
        "tokens_per_second": tokens_per_step / seconds,
        "model_tflops_per_second": tflops,
        "mfu": tflops / peak if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2 ** 30
        if torch.cuda.is_available() else None,
        "losses": losses,
        "all_step_seconds": step_seconds,
        "profile": profiled,
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="mini_proxy")
    parser.add_argument("--computes", nargs="+",
                        default=["reference", "fused", "fp8_blockwise", "fp8_tensorwise",
                                 "fp8_tensorwise_delayed",
                                 "fp8_tensorwise_delayed,compute.fp8_routed_experts=false",
                                 "fp8_blockwise,compute.fp8_routed_experts=false"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--profile-steps", type=int, default=0,
                        help="profile this many extra steps: GPU-busy fraction, top kernels")
    parser.add_argument("--child", nargs=2, metavar=("COMPUTE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return measure(args.recipe, args.child[0], args.steps, args.warmup, Path(args.child[1]),
                       args.profile_steps)

    results, failures, path = {}, {}, None
    with tempfile.TemporaryDirectory() as work:
        for compute in args.computes:
            record, log = Path(work) / f"{compute}.json", Path(work) / f"{compute}.log"
            try:
                torchrun(1, ["-m", "benchmarks.train_step_throughput", "--recipe", args.recipe,
                             "--steps", args.steps, "--warmup", args.warmup,
                             "--profile-steps", args.profile_steps,
                             "--child", compute, record], log)
                results[compute] = json.loads(record.read_text())
            except RuntimeError as error:
                failures[compute] = f"{error}\n{log.read_text()[-4000:]}"
            print(compute, json.dumps(results.get(compute) or failures[compute])[:400], flush=True)
            baseline = results.get(args.computes[0])
            for result in results.values():
                result["speedup"] = baseline["step_seconds"] / result["step_seconds"] if baseline else None
            # Rewritten after every setting, so a run stopped part-way keeps what it measured.
            if path is not None:
                path.unlink()
            path = write_result("train_step_throughput", {
                "recipe": args.recipe, "steps": args.steps, "warmup": args.warmup,
                "baseline": args.computes[0], "results": results, "failures": failures,
            })
    print(path)

if __name__ == "__main__":
    main()
