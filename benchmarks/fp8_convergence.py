"""FP8 convergence: the small hybrid (recipe=small) trained 300 steps in bf16 and in FP8 from the
same initial weights and data, plus checkpoints crossed between the two precisions.

    python -m benchmarks.fp8_convergence [--fp8 fp8_blockwise] [--bf16 fused]

Runs (one GPU, through launch/pretrain.py), two at a time on the same GPU:
  bf16, fp8          the whole stage in each compute setting (recipes/compute/*.yaml);
  fp8_to_bf16        the fp8 run's step-150 checkpoint resumed in bf16 to the end;
  bf16_to_fp8        the bf16 run's step-150 checkpoint resumed in FP8 to the end.
The recorded tokens/s are therefore those of a shared GPU: throughput is train_step_throughput's.
Passes when the final loss (mean of the last FINAL_WINDOW steps) of fp8 is within FINAL_RTOL of
bf16's, no run has a non-finite or diverging loss, and each crossed run's final loss is within
FINAL_RTOL of the run it continues. Writes benchmarks/results/fp8_convergence_*.json with the
curves.
"""

from __future__ import annotations

import argparse
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.common import write_result
from benchmarks.runs import ROOT, initial_weights, launch, step_records

FINAL_RTOL = 0.01
FINAL_WINDOW = 20
RESUME_STEP = 150
# A loss above this multiple of the run's running minimum counts as a divergence.
DIVERGENCE_FACTOR = 1.5


def final_loss(curve: dict) -> float:
    steps = sorted(curve)[-FINAL_WINDOW:]
    return sum(curve[s] for s in steps) / len(steps)


def diverged(curve: dict) -> bool:
    best = math.inf
    for step in sorted(curve):
        loss = curve[step]
        if not math.isfinite(loss) or loss > DIVERGENCE_FACTOR * best:
            return True
        best = min(best, loss)
    return False


def run(name: str, work: Path, overrides: list, port: int) -> dict:
    records = launch(1, work / name, ["recipe=small", f"data.cache_dir={work / 'cache'}",
                                      *overrides], work / f"{name}.log", port)
    curve = {r["stage_step"]: r["loss"] for r in step_records(records)}
    return {
        "overrides": [o.replace(f"{ROOT}/", "") for o in overrides],  # paths repo-relative
        "losses": curve,
        "final_loss": final_loss(curve),
        "diverged": diverged(curve),
        "eval_loss_merged": next((r["eval_loss_merged"] for r in records
                                  if "eval_loss_merged" in r), None),
        "tokens_per_second": sorted(r["tokens_per_second_per_device"]
                                    for r in step_records(records))[len(curve) // 2],
    }


def checkpoint(work: Path, name: str) -> Path:
    return work / name / "checkpoints" / "stages" / "s2k" / f"iter_{RESUME_STEP:07d}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fp8", default="fp8_blockwise", help="compute setting of the FP8 run")
    parser.add_argument("--bf16", default="fused", help="compute setting of the bf16 run")
    parser.add_argument("--work-dir", default="runs/fp8_convergence")
    args = parser.parse_args()

    work = (ROOT / args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    init = initial_weights(work / "init", ["recipe=small"], work / "init.log")
    common = [f"init_from={init}"]
    plan = {
        "bf16": [*common, f"compute={args.bf16}"],
        "fp8": [*common, f"compute={args.fp8}"],
        "fp8_to_bf16": [*common, f"compute={args.bf16}", f"checkpoint.load={checkpoint(work, 'fp8')}"],
        "bf16_to_fp8": [*common, f"compute={args.fp8}", f"checkpoint.load={checkpoint(work, 'bf16')}"],
    }
    runs, path = {}, None
    # The crossed runs need the first two's checkpoints; each pair shares the GPU.
    with ThreadPoolExecutor(max_workers=2) as pool:
        for phase in (("bf16", "fp8"), ("fp8_to_bf16", "bf16_to_fp8")):
            futures = {name: pool.submit(run, name, work, plan[name], 29511 + i)
                       for i, name in enumerate(phase)}
            for name, future in futures.items():
                runs[name] = future.result()
                print(name, {k: v for k, v in runs[name].items() if k != "losses"}, flush=True)
            # Rewritten after every phase, so a job stopped part-way keeps what it measured.
            if path is not None:
                path.unlink()
            path = write_result("fp8_convergence", {
                "final_rtol": FINAL_RTOL, "final_window": FINAL_WINDOW,
                "resume_step": RESUME_STEP, "shared_gpu": True, "runs": runs, **verdict(runs),
            })
    print(verdict(runs))
    print(path)


def verdict(runs: dict) -> dict:
    """The checks over the runs finished so far; `passed` only once all four are in."""
    rel = lambda a, b: abs(runs[a]["final_loss"] - runs[b]["final_loss"]) / runs[b]["final_loss"]
    pairs = {"fp8_vs_bf16_final_rel": ("fp8", "bf16"),
             "fp8_to_bf16_vs_fp8_final_rel": ("fp8_to_bf16", "fp8"),
             "bf16_to_fp8_vs_bf16_final_rel": ("bf16_to_fp8", "bf16")}
    checks = {key: rel(a, b) for key, (a, b) in pairs.items() if a in runs and b in runs}
    resumed = [name for name in ("fp8_to_bf16", "bf16_to_fp8") if name in runs]
    checks["resumed_runs_start_at_step"] = {name: min(runs[name]["losses"]) for name in resumed}
    passed = (
        len(runs) == 4
        and all(value <= FINAL_RTOL for key, value in checks.items() if key.endswith("_rel"))
        and not any(r["diverged"] for r in runs.values())
        and all(step == RESUME_STEP + 1 for step in checks["resumed_runs_start_at_step"].values())
    )
    return {"checks": checks, "passed": passed}

if __name__ == "__main__":
    main()
