"""Parallel-layout validation on GPUs: the mini-shaped proxy (recipe=mini_proxy) trained 20 steps
under each layout through the real launcher, from the same initial weights.

For every layout that fits the GPUs present it records the loss curve, tokens/s per GPU and
peak memory per GPU, and compares the curve with the single-GPU run (bf16: max relative loss
difference per step <= LOSS_RTOL). A resume check restarts from the reference run's step-10
checkpoint at another layout (the same one when only one GPU exists) and compares steps 11-20.
Writes `benchmarks/results/parallel_validation_<device>_<date>.json`.

    python -m benchmarks.parallel_validation [--layouts single tp2 pp2 ep2 tp2xep2]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path

import torch

from benchmarks.runs import ROOT, initial_weights, launch, median_after_warmup, step_records

# bf16 weights and activations: layouts reduce in different orders, and a near-tie in MoE
# routing may move a token between experts, so curves agree to bf16 precision, not bitwise.
LOSS_RTOL = 2e-2
LAYOUTS = {
    "single": {},
    "tp2": {"tensor_parallel": 2},
    "pp2": {"pipeline_parallel": 2},
    "ep2": {"expert_parallel": 2, "expert_tensor_parallel": 1},
    "tp2xep2": {"tensor_parallel": 2, "expert_parallel": 2, "expert_tensor_parallel": 1},
}


def world_size(layout: dict) -> int:
    dense = layout.get("tensor_parallel", 1) * layout.get("pipeline_parallel", 1)
    return max(dense, layout.get("expert_parallel", 1) * layout.get("pipeline_parallel", 1))


def train(name: str, layout: dict, work: Path, init: Path, extra: list) -> dict:
    out = work / name
    overrides = [f"parallel.{k}={v}" for k, v in layout.items()]
    records = launch(world_size(layout), out, ["recipe=mini_proxy", f"init_from={init}",
                     f"data.cache_dir={work / 'cache'}", *overrides, *extra], work / f"{name}.log")
    steps = step_records(records)
    return {
        "world_size": world_size(layout),
        "layout": layout,
        "losses": {r["stage_step"]: r["loss"] for r in steps},
        "tokens_per_second_per_gpu": median_after_warmup(
            [r["tokens_per_second_per_device"] for r in steps]),
        "peak_memory_gib": max(r["memory_gib"] for r in steps),
        "eval_loss_merged": next((r["eval_loss_merged"] for r in records if "eval_loss_merged" in r), None),
        "output_dir": str(out),
    }


def compare(losses: dict, reference: dict) -> float:
    common = sorted(set(losses) & set(reference))
    return max(abs(losses[s] - reference[s]) / abs(reference[s]) for s in common)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--work-dir", default="runs/parallel_validation")
    args = parser.parse_args()

    gpus = torch.cuda.device_count()
    work = (ROOT / args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    init = initial_weights(work / "init", ["recipe=mini_proxy"], work / "init.log")

    report = {
        "benchmark": "parallel_validation",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if gpus else "cpu",
        "gpus": gpus,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "cuda": torch.version.cuda,
                     "megatron_core": __import__("megatron.core").core.__version__},
        "loss_rtol": LOSS_RTOL,
        "layouts": {},
        "resume": None,
        "skipped": [],
        "all_passed": False,
    }
    device = report["device"].replace(" ", "_")
    path = ROOT / "benchmarks" / "results" / f"parallel_validation_{device}_{report['date'][:10]}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written after every run, so a job stopped part-way keeps what it measured.
    save = lambda: path.write_text(json.dumps(report, indent=2) + "\n")
    results = report["layouts"]

    reference = train("single", {}, work, init, [])
    results["single"] = {**reference, "max_rel_loss_diff": 0.0, "passed": True}
    save()
    for name in args.layouts:
        if name == "single":
            continue
        if world_size(LAYOUTS[name]) > gpus:
            report["skipped"].append(f"{name} (needs {world_size(LAYOUTS[name])} GPUs, {gpus} present)")
            continue
        run = train(name, LAYOUTS[name], work, init, [])
        diff = compare(run["losses"], reference["losses"])
        results[name] = {**run, "max_rel_loss_diff": diff, "passed": diff <= LOSS_RTOL}
        save()

    # Resume: the reference run's step-10 checkpoint, continued at another layout.
    resume_layout = next((n for n in results if n != "single"), "single")
    checkpoint = Path(reference["output_dir"]) / "checkpoints" / "stages" / "s4k" / "iter_0000010"
    resumed = train(f"resume_{resume_layout}", LAYOUTS[resume_layout], work, init,
                    [f"checkpoint.load={checkpoint}"])
    after = {s: l for s, l in reference["losses"].items() if s > 10}
    resume_diff = compare(resumed["losses"], after)
    report["resume"] = {
        "saved_at": "single", "resumed_at": resume_layout, "steps": sorted(resumed["losses"]),
        "max_rel_loss_diff": resume_diff,
        "passed": sorted(resumed["losses"]) == sorted(after) and resume_diff <= LOSS_RTOL,
    }
    report["all_passed"] = all(r["passed"] for r in results.values()) and report["resume"]["passed"]
    save()
    print(json.dumps({k: v for k, v in report.items() if k != "layouts"}, indent=2))
    for name, r in results.items():
        print(f"{name:8s} world {r['world_size']}  {r['tokens_per_second_per_gpu']:,.0f} tok/s/GPU  "
              f"{r['peak_memory_gib']:.1f} GiB  max rel loss diff {r['max_rel_loss_diff']:.2e}")


if __name__ == "__main__":
    main()
