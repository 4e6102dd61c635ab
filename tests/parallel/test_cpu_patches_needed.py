"""Every CPU patch is still needed: with it skipped, the scenario that needs it fails as recorded
here; with all patches, every scenario passes.

When megatron-core changes, a patch whose test fails here has either become unnecessary (the
scenario now passes without it: delete the patch) or fails differently (re-check the patch).
One launch per world size runs all of that world's cases one after another, re-applying the
patches for each, since a launch costs far more than a case.
"""

import os
import traceback
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import pytest

from ring_train.parallel.megatron_patches import apply_patches, patch_names, remove_patches
from ring_train.testing.multiprocess import run_ranks

from .tiny_gpt import Layout, train, train_resumed

pytestmark = pytest.mark.slow

RTOL = 1e-6


class WrongNumbers(Exception):
    """A scenario ran but its numbers differ from the reference."""


def _dense(directory: str) -> None:
    train(Layout(), steps=1)


def _moe_alltoall(directory: str) -> None:
    train(Layout(moe=True), steps=1)


def _distopt_resume(directory: str) -> None:
    resumed = train_resumed(Layout(distopt=True), Layout(distopt=True), directory)
    straight = train(Layout(distopt=True), steps=3)[1:]
    for got, want in zip(resumed, straight):
        for key in want:
            if abs(got[key] - want[key]) > RTOL * abs(want[key]):
                raise WrongNumbers(f"resumed {resumed} != uninterrupted {straight}")


def _tp2_sequence_parallel(directory: str) -> None:
    train(Layout(tp=2), steps=1)


def _ep2_alltoall(directory: str) -> None:
    train(Layout(moe=True, ep=2), steps=1)


def _tp2_ep2_alltoall(directory: str) -> None:
    train(Layout(moe=True, tp=2, ep=2), steps=1)


# scenario name -> (world size, run(checkpoint_directory))
SCENARIOS: Dict[str, Tuple[int, Callable[[str], None]]] = {
    "dense": (1, _dense),
    "moe_alltoall": (1, _moe_alltoall),
    "distopt_checkpoint_resume": (1, _distopt_resume),
    "tp2_sequence_parallel": (2, _tp2_sequence_parallel),
    "ep2_alltoall": (2, _ep2_alltoall),
    "tp2_ep2_alltoall": (4, _tp2_ep2_alltoall),
}


@dataclass(frozen=True)
class Need:
    """With `patch` skipped, `scenario` raises `error` containing `message`, from `where`
    (megatron-core file:function of the innermost megatron frame; None when no frame is)."""

    patch: str
    scenario: str
    error: str
    message: str
    where: Optional[str]


NO_CUDA = "Torch not compiled with CUDA enabled"
NEEDS = [
    Need("rng_tracker_on_cpu_generator", "dense", "AssertionError", NO_CUDA,
         "tensor_parallel/random.py:add"),
    Need("current_device_is_cpu", "dense", "AssertionError", NO_CUDA,
         "distributed/param_and_grad_buffer.py:__init__"),
    Need("cuda_streams_are_noops", "moe_alltoall", "RuntimeError",
         "torch.cuda.Stream requires CUDA support", "transformer/moe/token_dispatcher.py:__init__"),
    Need("cuda_synchronize_is_noop", "distopt_checkpoint_resume", "AssertionError", NO_CUDA,
         "dist_checkpointing/strategies/filesystem_async.py:preload_tensors"),
    Need("cuda_tensors_made_on_cpu", "dense", "AssertionError", NO_CUDA,
         "optimizer/optimizer.py:__init__"),
    Need("cpu_tensors_report_cuda_type", "dense", "AssertionError", "",
         "optimizer/clip_grads.py:clip_grad_by_total_norm_fp32"),
    Need("router_gemm_without_te", "moe_alltoall", "NameError",
         "name 'te_general_gemm' is not defined", "transformer/moe/moe_utils.py:forward"),
    Need("moe_split_sizes_as_numpy", "ep2_alltoall", "TypeError",
         "all_to_all_single(): incompatible function arguments",
         "tensor_parallel/mappings.py:forward"),
    Need("uneven_all_gather_on_gloo", "tp2_ep2_alltoall", "RuntimeError",
         "ProcessGroupGloo::allgather: invalid tensor size",
         "tensor_parallel/mappings.py:_gather_along_first_dim"),
    Need("torch_norm_with_sequence_parallel", "tp2_sequence_parallel", "AssertionError",
         "sequence parallel not supported by torch LayerNorm", "transformer/torch_norm.py:__new__"),
    Need("distopt_fresh_adam_state", "distopt_checkpoint_resume", "AssertionError", "",
         "optimizer/distrib_optimizer.py:state_dict"),
    # Silent: the resumed run's losses and grad norms drift from the uninterrupted run's.
    Need("distopt_step_per_param", "distopt_checkpoint_resume", "WrongNumbers", "resumed", None),
    Need("distopt_state_copy_skips_step", "distopt_checkpoint_resume", "KeyError", "'step'",
         "optimizer/distrib_optimizer.py:_set_main_param_and_optimizer_states"),
]


def _innermost_megatron_frame(exc: BaseException) -> Optional[str]:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "megatron/core/" in f.filename]
    if not frames:
        return None
    return f"{frames[-1].filename.split('megatron/core/')[1]}:{frames[-1].name}"


def _run_cases(rank: int, cases, directory: str) -> dict:
    """Run (skipped patch or None, scenario) cases in order; return their failures or None."""
    from megatron.core import parallel_state

    outcomes = {}
    for skip, scenario in cases:
        remove_patches()
        apply_patches(skip=[skip] if skip else [])
        try:
            SCENARIOS[scenario][1](os.path.join(directory, f"{scenario}-without-{skip}"))
            outcomes[skip, scenario] = None
        except Exception as exc:  # noqa: BLE001 - the failure is the result
            where = _innermost_megatron_frame(exc)
            outcomes[skip, scenario] = (type(exc).__name__, str(exc), where)
        finally:
            parallel_state.destroy_model_parallel()
    remove_patches()
    return outcomes


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """world size -> {(skipped patch or None, scenario): failure or None}, one launch each."""
    by_world = {}

    def for_world(world_size: int) -> dict:
        if world_size not in by_world:
            cases = [(n.patch, n.scenario) for n in NEEDS if SCENARIOS[n.scenario][0] == world_size]
            cases += [(None, s) for s, (world, _) in SCENARIOS.items() if world == world_size]
            directory = str(tmp_path_factory.mktemp(f"world{world_size}"))
            per_rank = run_ranks(_run_cases, world_size, cases, directory, timeout=300)
            # A case's outcome is the first failing rank's; ranks fail alike in these cases.
            by_world[world_size] = {
                case: next((r[case] for r in per_rank if r[case] is not None), None)
                for case in cases
            }
        return by_world[world_size]

    return for_world


def test_every_patch_has_a_recorded_need():
    assert sorted(n.patch for n in NEEDS) == sorted(patch_names())


@pytest.mark.parametrize("need", NEEDS, ids=lambda n: n.patch)
def test_patch_is_still_needed(need, outcomes):
    failure = outcomes(SCENARIOS[need.scenario][0])[need.patch, need.scenario]
    assert failure is not None, f"{need.scenario} passes without {need.patch}: drop the patch"
    error, message, where = failure
    assert (error, where) == (need.error, need.where), message
    assert need.message in message


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_scenario_passes_with_all_patches(scenario, outcomes):
    assert outcomes(SCENARIOS[scenario][0])[None, scenario] is None
