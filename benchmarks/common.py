"""What every benchmark records: the environment, the timing rule and the JSON file it writes.

Imports nothing heavy at module level: benchmarks that measure their own memory import it first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib.metadata
import json
import pathlib
import platform
import sys
from typing import Callable, Iterator

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"


def version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment() -> dict:
    """Device, library versions and the UTC time of the run."""
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor()
    return {
        "device": device or platform.machine(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": version("triton"),
        "megatron_core": version("megatron-core"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| in fp64 (an all-zero b divides by 1e-30: 0 when a is zero too)."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def median_ms(fn: Callable[[], object], warmup: int = 25, rep: int = 100) -> float:
    """Median wall time of `fn` on the GPU in ms (triton.testing.do_bench, L2 flushed)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def gpu_ms(fn: Callable[[], object], runs: int = 20, warmup: int = 3) -> float:
    """Device time of one call of `fn` in ms: the summed durations of the kernels, copies and
    memsets it runs on the GPU (torch.profiler), averaged over `runs` calls, each after an L2
    flush as in median_ms. Unlike median_ms it leaves out the host's Python and launch overheads
    (which training overlaps with other layers' GPU work) and the GPU's idle time waiting for
    them."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    flush = torch.empty(256 * 2 ** 20, dtype=torch.int8, device="cuda")
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(runs):
            flush.bitwise_not_()  # a kernel `fn` never runs, left out of the sum below
            fn()
        torch.cuda.synchronize()
    total_us = sum(e.device_time_total for e in prof.events()
                   if e.device_type == DeviceType.CUDA and "bitwise_not" not in e.name)
    return total_us / runs / 1e3


def fused_vs_unfused(fused: Callable[[], object], unfused: Callable[[], object]) -> dict:
    """Both timings of a fused kernel and the unfused sequence it replaces: as called
    (median_ms: what an eager loop that waits on the GPU sees) and on the GPU (gpu_ms: the work
    the kernels do), with the speedup of each."""
    t = {"fused_ms": median_ms(fused), "unfused_ms": median_ms(unfused),
         "fused_gpu_ms": gpu_ms(fused), "unfused_gpu_ms": gpu_ms(unfused)}
    t["speedup"] = t["unfused_ms"] / t["fused_ms"]
    t["gpu_speedup"] = t["unfused_gpu_ms"] / t["fused_gpu_ms"]
    return t


def write_result(name: str, payload: dict, out_dir: pathlib.Path = RESULTS_DIR) -> pathlib.Path:
    """Writes `{environment, **payload}` to `<out_dir>/<name>_<UTC stamp>.json`; returns the path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = out_dir / f"{name}_{stamp}.json"
    path.write_text(json.dumps({"environment": environment(), **payload}, indent=2) + "\n")
    return path


def write_checked_result(name: str, payload: dict, accurate: bool) -> pathlib.Path:
    """write_result(name, payload) and print where; then, if a kernel failed its accuracy check
    (`accurate` False), exit non-zero: the JSON is kept for inspection."""
    path = write_result(name, payload)
    print(f"wrote {path}")
    if not accurate:
        sys.exit(f"{name}: accuracy check failed for a fused kernel (see {path})")
    return path


def copy_bandwidth(device: str = "cuda") -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + bytes written), of a 1 GiB copy."""
    import torch

    x = torch.empty(2 ** 30, dtype=torch.uint8, device=device).random_(0, 255)
    y = torch.empty_like(x)
    return 2 * x.numel() / (median_ms(lambda: y.copy_(x)) * 1e-3)


@contextlib.contextmanager
def launch_config(module, **overrides) -> Iterator[object]:
    """module.CONFIG (a dataclass of launch parameters) replaced by a copy with `overrides` for
    the with-block, restored after it (configuration sweeps)."""
    default = module.CONFIG
    module.CONFIG = dataclasses.replace(default, **overrides)
    try:
        yield module.CONFIG
    finally:
        module.CONFIG = default


def sweep_configs(module, kernel: str, overrides_list, runs: dict) -> list:
    """Fused timings (median_ms of the first of each (fused, unfused) pair in `runs` whose name
    starts with `kernel`) under each launch configuration of overrides_list (launch_config); one
    printed row per configuration."""
    rows = []
    for overrides in overrides_list:
        with launch_config(module, **overrides):
            row = {"kernel": kernel, "config": {k: list(v) if isinstance(v, tuple) else v
                                                for k, v in overrides.items()}}
            row.update({name: median_ms(fused) for name, (fused, _) in runs.items()
                        if name.startswith(kernel)})
        rows.append(row)
        print(row, flush=True)
    return rows
