"""Patches for megatron-core 0.16.1 where it assumes CUDA or Transformer Engine / Apex, and
replacements of its slow code on our paths.

Two kinds of fixes, each registered by name so a test can skip one and show that the scenario
needing it still fails (tests/parallel/test_cpu_patches_needed.py):
  * CPU patches let it run on CPU with gloo (tests and CI); never applied where CUDA exists.
  * no-TE fixes repair megatron-core bugs on paths without Transformer Engine / Apex; they are
    applied on every device, GPUs included, whenever Transformer Engine is not installed.
Speed replacements compute exactly what the megatron-core code they replace computes (tests
compare the two: tests/parallel/test_megatron_speedups.py) without its host-device syncs; they
are applied on every device.
"""

import copy
import importlib.util
import logging
from contextlib import nullcontext
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

_PATCHES: Dict[str, Callable[[], None]] = {}
_NO_TE_FIXES: set = set()  # names of the patches needed on any device without TE
_applied: Optional[Tuple[str, ...]] = None  # names of the active patches; None before any call
_undo: List[Callable[[], None]] = []


def _patch(fn: Callable[[], None]) -> Callable[[], None]:
    _PATCHES[fn.__name__] = fn
    return fn


def _no_te_fix(fn: Callable[[], None]) -> Callable[[], None]:
    _NO_TE_FIXES.add(fn.__name__)
    return _patch(fn)


_SPEEDUPS: Dict[str, Callable[[], None]] = {}


def _speedup(fn: Callable[[], None]) -> Callable[[], None]:
    _SPEEDUPS[fn.__name__] = fn
    return fn


def _replace(owner: object, attr: str, value: object) -> None:
    """setattr that remembers how to put the original back."""
    had_own = attr in vars(owner)
    original = vars(owner).get(attr)
    setattr(owner, attr, value)
    _undo.append(lambda: setattr(owner, attr, original) if had_own else delattr(owner, attr))


def _push_mode(mode: TorchFunctionMode) -> None:
    mode.__enter__()
    _undo.append(lambda: mode.__exit__(None, None, None))


def _is_cuda(device: object) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


# --- RNG -----------------------------------------------------------------------------------


@_patch
def rng_tracker_on_cpu_generator() -> None:
    # model_parallel_cuda_manual_seed and every tracker fork() read and write CUDA RNG states;
    # on CPU the tracked states are states of the CPU generator instead.
    from megatron.core.tensor_parallel import random

    def get_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"cuda rng state {name} already exists")
        original = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(original)

    _replace(random, "_get_cuda_rng_state", get_state)
    _replace(random, "_set_cuda_rng_state", set_state)
    _replace(random.CudaRNGStatesTracker, "add", add)


# --- devices and streams -------------------------------------------------------------------


@_patch
def current_device_is_cpu() -> None:
    # megatron passes torch.cuda.current_device() as `device=` in many places (RoPE frequencies,
    # p2p receive buffers, collective output buffers).
    _replace(torch.cuda, "current_device", lambda: torch.device("cpu"))


class _NoopEvent:
    def synchronize(self) -> None:
        pass


class _NoopStream:
    """Stands in for torch.cuda.Stream: CPU ops are synchronous, so ordering is already right."""

    def wait_stream(self, stream: "_NoopStream") -> None:
        pass

    def record_event(self) -> _NoopEvent:
        return _NoopEvent()


_CPU_STREAM = _NoopStream()


@_patch
def cuda_streams_are_noops() -> None:
    # The MoE alltoall dispatcher copies split sizes to the host on a side CUDA stream.
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    # The dispatcher caches that stream on its class: undoing this patch must drop the fake.
    _replace(MoEAlltoAllTokenDispatcher, "cuda_dtoh_stream", None)
    _replace(torch.cuda, "Stream", _NoopStream)
    _replace(torch.cuda, "current_stream", lambda device=None: _CPU_STREAM)
    _replace(torch.cuda, "stream", lambda stream: nullcontext())


@_patch
def cuda_synchronize_is_noop() -> None:
    # dist_checkpointing.save waits for its device-to-host copies with torch.cuda.synchronize().
    _replace(torch.cuda, "synchronize", lambda device=None: None)


class _CudaTensorsOnCpu(TorchFunctionMode):
    """Creates on CPU what megatron creates with device='cuda', and makes .cuda() a no-op."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if _is_cuda(kwargs.get("device")):
            kwargs = {**kwargs, "device": torch.device("cpu")}
        return func(*args, **kwargs)


@_patch
def cuda_tensors_made_on_cpu() -> None:
    # The optimizer, grad clipping, pipeline schedules and the causal mask create small tensors
    # with device='cuda' literally (not through current_device()); the distributed optimizer's
    # checkpoint gather calls .cuda().
    _push_mode(_CudaTensorsOnCpu())


class _CpuTensorsReportCudaType(TorchFunctionMode):
    """Makes Tensor.type() say 'torch.cuda.FloatTensor' where it would say 'torch.FloatTensor'."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return result.replace("torch.", "torch.cuda.", 1)
        return result


@_patch
def cpu_tensors_report_cuda_type() -> None:
    # The optimizers and grad clipping accept parameters by comparing Tensor.type() with
    # 'torch.cuda.FloatTensor' etc., and reject CPU tensors.
    _push_mode(_CpuTensorsReportCudaType())


# --- MoE -----------------------------------------------------------------------------------


@_no_te_fix
def router_gemm_without_te() -> None:
    # moe_utils only defines te_general_gemm when Transformer Engine imports, yet the router
    # gating reads it unconditionally: NameError without TE, on GPUs too (whatever
    # moe_router_dtype is: the name is read first).
    from megatron.core.transformer.moe import moe_utils

    _replace(moe_utils, "te_general_gemm", None)


@_patch
def moe_split_sizes_as_numpy() -> None:
    # maybe_move_tensor_to_cpu ignores as_numpy for tensors already on CPU, so the alltoall
    # dispatcher hands tensors to all_to_all_single, which only takes lists of ints.
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor):
            return tensor.numpy()
        return tensor

    _replace(moe_utils, "maybe_move_tensor_to_cpu", maybe_move_tensor_to_cpu)
    _replace(token_dispatcher, "maybe_move_tensor_to_cpu", maybe_move_tensor_to_cpu)


@_patch
def uneven_all_gather_on_gloo() -> None:
    # gloo's all_gather needs equal sizes; the MoE alltoall dispatcher with TP > 1 gathers a
    # different number of tokens from each TP rank. Pad to the largest, gather, then cut.
    from megatron.core.tensor_parallel import mappings

    original = mappings._gather_along_first_dim

    def gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or len(set(output_split_sizes)) <= 1:
            return original(input_, group, output_split_sizes, use_global_buffer)
        largest = max(output_split_sizes)
        padded = input_.new_zeros((largest, *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        gathered = original(padded, group)
        pieces = gathered.split(largest)
        return torch.cat([p[:n] for p, n in zip(pieces, output_split_sizes)])

    _replace(mappings, "_gather_along_first_dim", gather_along_first_dim)


# --- norms ---------------------------------------------------------------------------------


@_patch
def torch_norm_with_sequence_parallel() -> None:
    # WrappedTorchNorm, the only norm without TE/Apex, refuses sequence_parallel. A plain norm
    # is right under SP as long as its grads are summed over TP, which finalize_model_grads
    # does for params tagged `sequence_parallel`.
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    original_new = WrappedTorchNorm.__new__

    def new(cls, config, *args, **kwargs):
        config_without_sp = copy.copy(config)
        config_without_sp.sequence_parallel = False
        norm = original_new(cls, config_without_sp, *args, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm

    _replace(WrappedTorchNorm, "__new__", staticmethod(new))


# --- distributed optimizer checkpoint loading without TE/Apex ------------------------------
# (megatron-core bugs on any device without TE/Apex, not only on CPU)


@_no_te_fix
def distopt_fresh_adam_state() -> None:
    # Without TE/Apex, DistributedOptimizer.state_dict() asserts that all torch Adam states share
    # one `step`; a freshly built optimizer has no state at all, so building the template to
    # load a checkpoint into fails. Give it empty Adam state at step 0 first.
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer.state_dict

    def state_dict(self):
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                if not self.optimizer.state[param]:
                    self.optimizer.state[param] = {
                        "step": torch.tensor(0.0),
                        "exp_avg": torch.zeros_like(param),
                        "exp_avg_sq": torch.zeros_like(param),
                    }
        return original(self)

    _replace(DistributedOptimizer, "state_dict", state_dict)


@_no_te_fix
def distopt_step_per_param() -> None:
    # Without TE/Apex, load_state_dict puts one shared `step` tensor into every parameter's
    # state; torch Adam increments it in place once per parameter, so the bias correction
    # runs ahead and the first steps after a resume are wrong.
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer.load_state_dict

    def load_state_dict(self, state_dict):
        original(self, state_dict)
        for state in self.optimizer.state.values():
            if "step" in state:
                state["step"] = state["step"].clone()

    _replace(DistributedOptimizer, "load_state_dict", load_state_dict)


@_no_te_fix
def distopt_state_copy_skips_step() -> None:
    # The fully_reshardable loader leaves torch Adam's `step` out of the tensors it hands over
    # (load_state_dict has set it), but _set_main_param_and_optimizer_states copies every key
    # the live state has: KeyError 'step'. Copy only what was handed over.
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    def set_states(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        destinations = {"param": main_param, **self.optimizer.state[main_param]}
        for key, source in tensors.items():
            destinations[key].copy_(source)

    _replace(DistributedOptimizer, "_set_main_param_and_optimizer_states", set_states)


# --- speed ---------------------------------------------------------------------------------


def roll_left_within_documents(tensor: torch.Tensor, cu_seqlens: torch.Tensor
                               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(tensor shifted one position left along its last dim within each packed document
    [cu_seqlens[i], cu_seqlens[i + 1]), the last position of each document set to 0 and
    positions outside all documents unchanged; its sum), with no host-device sync."""
    length = tensor.shape[-1]
    device = tensor.device
    starts, ends = cu_seqlens[:-1].long(), cu_seqlens[1:].long()
    # 1 at the last position of every non-empty document (an empty one marks nothing).
    last = torch.zeros(length, dtype=torch.int8, device=device).scatter_reduce_(
        0, (ends - 1).clamp(0, length - 1), (ends > starts).to(torch.int8), "amax")
    positions = torch.arange(length, device=device)
    outside = (positions < cu_seqlens[0]) | (positions >= cu_seqlens[-1])
    rolled = torch.roll(tensor, shifts=-1, dims=-1)
    rolled = torch.where(last.bool(), torch.zeros((), dtype=tensor.dtype, device=device), rolled)
    rolled = torch.where(outside, tensor, rolled)
    return rolled, rolled.sum()


@_speedup
def mtp_packed_roll_without_syncs() -> None:
    # Multi-token prediction rolls input ids, positions, labels and the loss mask one token left
    # within each packed document. megatron-core loops over the documents, slicing at
    # cu_seqlens entries read back from the GPU: two syncs per document per roll, ~650 per step
    # of the Ring-mini proxy (8 micro-batches of 4K tokens in ~1K-token documents). Without
    # context parallelism (the only case replaced) one roll and two masks do it.
    from megatron.core.transformer import multi_token_prediction as mtp

    original = mtp._roll_tensor_packed_seq

    def roll(tensor, shifts, dims, packed_seq_params, cp_group=None):
        cp_size = cp_group.size() if cp_group is not None else 1
        cu_seqlens = packed_seq_params.cu_seqlens_q
        if cp_size > 1 or shifts != -1 or dims not in (-1, tensor.dim() - 1) or cu_seqlens is None:
            return original(tensor, shifts, dims, packed_seq_params, cp_group)
        return roll_left_within_documents(tensor, cu_seqlens)

    _replace(mtp, "_roll_tensor_packed_seq", roll)


# --- public API ----------------------------------------------------------------------------


def patch_names() -> Tuple[str, ...]:
    """Names of all registered patches, in the order they are applied."""
    return tuple(_PATCHES)


def no_te_fix_names() -> Tuple[str, ...]:
    """Names of the patches that fix megatron-core without Transformer Engine on any device."""
    return tuple(name for name in _PATCHES if name in _NO_TE_FIXES)


def _needed_here() -> Tuple[str, ...]:
    if not torch.cuda.is_available():
        return patch_names()
    if importlib.util.find_spec("transformer_engine") is None:
        return no_te_fix_names()
    return ()


def apply_patches(skip: Iterable[str] = ()) -> None:
    """Apply the patches this machine needs, except those in `skip`: all of them on CPU, the
    no-TE fixes on GPUs without Transformer Engine, none otherwise; and every speed replacement.

    Idempotent: the first call in a process decides which patches are active, and later calls
    (init_distributed makes one) change nothing until remove_patches(). That lets a test
    skip a patch and then run code that initializes as usual. Unknown names in `skip` are an
    error, so a misspelled name cannot silently skip nothing.
    """
    skip = set(skip)
    unknown = skip - set(_PATCHES)
    if unknown:
        raise ValueError(f"unknown patch names {sorted(unknown)}; known: {list(_PATCHES)}")
    global _applied
    if _applied is not None:
        return
    _applied = tuple(name for name in _needed_here() if name not in skip)
    for name in _applied:
        _PATCHES[name]()
    for apply_speedup in _SPEEDUPS.values():
        apply_speedup()
    if _applied:
        logger.info("megatron-core patches applied: %s", ", ".join(_applied))


def applied_patches() -> Tuple[str, ...]:
    """Names of the patches active now."""
    return _applied or ()


def remove_patches() -> None:
    """Undo every applied patch, newest first."""
    global _applied
    while _undo:
        _undo.pop()()
    _applied = None
