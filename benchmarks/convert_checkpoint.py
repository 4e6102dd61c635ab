"""HF <-> training checkpoint conversion: throughput and peak memory at Ring-flash shapes.

    python -m benchmarks.convert_checkpoint [--layers 3] [--layer-group-size 2] [--work DIR]
        [--out benchmarks/results]

Writes a random Ling-flash-2.0-shaped HF checkpoint with a few layers (real vocabulary, hidden
size, heads and expert shapes: 256 experts of 1024, one dense layer first) in 5 GB shards, as
`save_pretrained` shards, then runs the conversion tool as a child process, as a user would:
`import` to the hybrid (lightning layers converted) and `export` back to HF. Each run reports
wall time, throughput (the model's bytes in the source shards / s) and the child's peak RSS against the largest source
shard; the claim checked is peak RSS < 3x the largest shard. Writes JSON (device, versions,
date, results) to --out.
"""

import argparse
import datetime
import json
import os
import pathlib
import platform
import resource
import shutil
import subprocess
import sys
import time

from benchmarks.common import version

# torch and ring_train are imported only where the source is written, in a child process: a
# child's peak RSS as the kernel reports it is at least its parent's at the time it was
# started, so the measuring process must stay small.

REPO = pathlib.Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "convert_ling_ckpt.py"
SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size "5GB"
RSS_LIMIT_SHARDS = 3


def cpu_name() -> str:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def write_flash_subset(directory: pathlib.Path, layers: int) -> None:
    """A random bf16 Ling-2.0 checkpoint of Ling-flash shapes with `layers` layers."""
    import dataclasses

    import torch

    from ring_train.checkpoint.hf_config import model_config_to_hf
    from ring_train.checkpoint.hf_import import expected_hf_shapes
    from ring_train.checkpoint.hf_io import HFCheckpointWriter
    from ring_train.config.model import load_model_config

    flash = load_model_config("flash")
    cfg = dataclasses.replace(flash, num_hidden_layers=layers, layer_group_size=1,
                              group_norm_size=flash.num_attention_heads)
    config = model_config_to_hf(cfg)
    writer = HFCheckpointWriter(directory, config, max_shard_bytes=SHARD_BYTES)
    generator = torch.Generator().manual_seed(0)
    for name, shape in expected_hf_shapes(cfg).items():
        if name.endswith("expert_bias"):
            tensor = 0.01 * torch.randn(shape, generator=generator)
        elif name.endswith("norm.weight"):
            tensor = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensor = (0.02 * torch.randn(shape, generator=generator)).to(torch.bfloat16)
        writer.add(name, tensor)
    writer.finish()


def shard_sizes(directory: pathlib.Path) -> dict:
    weight_map = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    return {shard: (directory / shard).stat().st_size for shard in set(weight_map.values())}


def directory_bytes(directory: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def run_child(command) -> dict:
    """Run `command` in a child process: wall seconds and the child's peak RSS."""
    start = time.monotonic()
    child = subprocess.Popen(list(map(str, command)), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.monotonic() - start
    out, err = child.stdout.read(), child.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(map(str, command))} failed:\n{err[-4000:]}")
    return {"seconds": seconds, "peak_rss_bytes": usage.ru_maxrss * 1024, "stdout": out.strip()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=3, help="layer 0 dense, the others MoE")
    p.add_argument("--layer-group-size", type=int, default=2,
                   help="lightning layers in the import (flash uses 8; 2 converts some of few layers)")
    p.add_argument("--group-norm-size", type=int, default=8)
    p.add_argument("--work", type=pathlib.Path, default=pathlib.Path("/tmp/convert_checkpoint_bench"))
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/results"))
    p.add_argument("--write-source", type=pathlib.Path, help=argparse.SUPPRESS)  # the child's job
    args = p.parse_args()
    if args.write_source:
        write_flash_subset(args.write_source, args.layers)
        return

    shutil.rmtree(args.work, ignore_errors=True)
    source, checkpoint, exported = args.work / "ling_hf", args.work / "checkpoint", args.work / "exported_hf"
    written = run_child([sys.executable, "-m", "benchmarks.convert_checkpoint", "--layers", args.layers,
                         "--write-source", source])
    print(f"source written in {written['seconds']:.0f} s", flush=True)
    shards = shard_sizes(source)
    largest, source_bytes = max(shards.values()), sum(shards.values())
    config = json.loads((source / "config.json").read_text())

    runs = {
        "import_hybrid": ["import", "--hf", source, "--out", checkpoint, "--quiet",
                          "--layer-group-size", args.layer_group_size,
                          "--group-norm-size", args.group_norm_size],
        "export_hf": ["export", "--checkpoint", checkpoint, "--out", exported, "--quiet"],
    }
    results = []
    for name, tool_args in runs.items():
        run = run_child([sys.executable, TOOL, *tool_args])
        row = {
            "run": name,
            "seconds": round(run["seconds"], 1),
            "model_MB": round(source_bytes / 1e6),
            "MB_per_s": round(source_bytes / 1e6 / run["seconds"], 1),
            "peak_rss_GB": round(run["peak_rss_bytes"] / 1e9, 2),
            "largest_shard_GB": round(largest / 1e9, 2),
            "peak_rss_over_largest_shard": round(run["peak_rss_bytes"] / largest, 2),
            "within_3x_largest_shard": run["peak_rss_bytes"] < RSS_LIMIT_SHARDS * largest,
        }
        results.append(row)
        print(json.dumps(row), flush=True)
    sizes = {"checkpoint_GB": directory_bytes(checkpoint) / 1e9, "exported_hf_GB": directory_bytes(exported) / 1e9}
    shutil.rmtree(args.work, ignore_errors=True)

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    result = {
        "benchmark": "convert_checkpoint",
        "device": f"CPU: {cpu_name()}, {os.cpu_count()} cores, "
                  f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM",
        "date": stamp,
        "versions": {"python": platform.python_version(), "torch": version("torch"),
                     "megatron-core": version("megatron-core"), "safetensors": version("safetensors")},
        # A floor under every peak below (see the imports); far below them, so they are the tool's.
        "measuring_process_peak_rss_GB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 2),
        "source": {"layers": args.layers, "shards": len(shards),
                   "bytes": source_bytes, "largest_shard_bytes": largest,
                   "config": {k: config[k] for k in ("hidden_size", "num_attention_heads",
                              "num_key_value_heads", "head_dim", "intermediate_size", "num_experts",
                              "moe_intermediate_size", "vocab_size", "num_hidden_layers")}},
        "import_options": {"layer_group_size": args.layer_group_size, "group_norm_size": args.group_norm_size},
        "written_GB": {k: round(v, 2) for k, v in sizes.items()},
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"convert_checkpoint_{stamp}.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
