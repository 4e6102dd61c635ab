"""Routed experts over stacked weights: a drop-in for megatron's SequentialMLP.

`GroupedExperts` holds the local experts' SwiGLU weights stacked, fc1 [E_local, 2F, d] (gate rows,
then up rows, as each expert's linear_fc1) and fc2 [E_local, d, F], and computes them with
`expert_mlp` (ring_train/model/expert_mlp.py): one `torch._grouped_mm` per projection on CUDA bf16
tensors, with `tokens_per_expert` turned into group offsets on the device (no host sync); a loop
over experts elsewhere; FP8 grouped GEMMs with `compute.fp8`; fc1 + SwiGLU recomputed in backward
with `compute.recompute_experts`. The routing probability scales each token's activation before
fc2, where SequentialMLP applies it (or its input, with config.moe_apply_probs_on_input).

Checkpoints are SequentialMLP's, key for key: the plain state dict names each expert's tensors
`local_experts.{e}.linear_fc{1,2}.weight`, and the sharded state dict saves per-expert tensors under
`experts.linear_fc{1,2}.weight` with the expert's global index on a leading axis (the SwiGLU fc1
split into its gate and up halves), built by megatron's own helpers on views of the stacked
weights. Each stacked weight is one ShardedTensorFactory whose data is the parameter itself, which
is what the distributed optimizer needs to map its state onto the checkpoint.

Expert tensor parallelism is not supported (expert_tensor_parallel_size must be 1); expert
parallelism of any size is.
"""

from __future__ import annotations

import copy
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.random import (
    get_cuda_rng_tracker,
    get_expert_parallel_rng_tracker_name,
)
from megatron.core.transformer.mlp import MLPSubmodules, apply_swiglu_sharded_factory
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
)
from torch import Tensor

from ring_train.model.expert_mlp import expert_mlp

# (state-dict name of the projection, its tensor-parallel axis in megatron's linear layers)
_PROJECTIONS = (("linear_fc1", 0), ("linear_fc2", 1))


class GroupedExperts(MegatronModule):
    """The local experts of an MoE layer; constructor and forward as megatron's SequentialMLP.

    forward(permuted_local_hidden_states [M, d], tokens_per_expert [E_local] (CPU or device
    integers summing to M), permuted_probs [M] fp32) -> (output [M, d], None). Rows are sorted by
    local expert. The routing probability scales each token's activation before fc2, as in
    SequentialMLP (or its input, with config.moe_apply_probs_on_input).
    """

    def __init__(
        self,
        num_local_experts: int,
        config,
        submodules: Optional[MLPSubmodules] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        _check_supported(config)
        if pg_collection is None:
            pg_collection = get_default_pg_collection()
        self.num_local_experts = num_local_experts
        self.ep_group = pg_collection.ep
        self.tp_group = pg_collection.expt_tp
        self.dp_group = pg_collection.expt_dp
        if self.tp_group is not None and self.tp_group.size() > 1:
            raise ValueError(
                f"GroupedExperts needs expert_tensor_parallel_size = 1, got "
                f"{self.tp_group.size()}: set parallel.expert_tensor_parallel=1 (experts are then "
                "split by expert parallelism only), or build the MoE layer with SequentialMLP."
            )
        hidden = config.hidden_size
        ffn = config.moe_ffn_hidden_size
        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        kwargs = dict(device=device, dtype=config.params_dtype)
        self.fc1_weight = torch.nn.Parameter(
            torch.empty(num_local_experts, 2 * ffn, hidden, **kwargs))
        self.fc2_weight = torch.nn.Parameter(torch.empty(num_local_experts, hidden, ffn, **kwargs))
        # As megatron's expert linear layers: tensor-parallel (of size 1 here) along the output
        # rows of fc1 (interleaved gate/up: stride 2) and the input columns of fc2, one axis
        # further in because of the expert axis; the DDP reduces them over the expert
        # data-parallel group (allreduce False) once experts are split over ranks (EP > 1),
        # with the dense parameters otherwise, exactly as SequentialMLP's.
        set_tensor_model_parallel_attributes(self.fc1_weight, True, 1, 2)
        set_tensor_model_parallel_attributes(self.fc2_weight, True, 2, 1)
        for weight in (self.fc1_weight, self.fc2_weight):
            setattr(weight, "allreduce", not config.expert_model_parallel_size > 1)
        if config.perform_initialization:
            self._initialize()

    @torch.no_grad()
    def _initialize(self) -> None:
        """Each expert's fc1 then fc2, drawn as SequentialMLP's linear layers draw them (same
        generator, order and precision), so a seed gives the same experts in both modules."""
        config = self.config
        if config.use_cpu_initialization:
            for e in range(self.num_local_experts):
                for weight, init in ((self.fc1_weight, config.init_method),
                                     (self.fc2_weight, config.output_layer_init_method)):
                    master = torch.empty(weight.shape[1:], dtype=torch.float32,
                                         device=weight.device)
                    init(master)
                    weight[e].copy_(master.to(config.params_dtype))
        else:
            with get_cuda_rng_tracker().fork(get_expert_parallel_rng_tracker_name()):
                for e in range(self.num_local_experts):
                    config.init_method(self.fc1_weight[e])
                    config.output_layer_init_method(self.fc2_weight[e])

    # -- forward -------------------------------------------------------------------------------

    def forward(self, permuted_local_hidden_states: Tensor, tokens_per_expert: Tensor,
                permuted_probs: Tensor) -> Tuple[Tensor, None]:
        x, probs = permuted_local_hidden_states, permuted_probs
        if self.config.moe_apply_probs_on_input:
            assert self.config.moe_router_topk == 1, (
                "`moe_apply_probs_on_input` only works with `moe_router_topk`=1."
            )
            x = (probs.unsqueeze(-1) * x).to(x.dtype)
            probs = torch.ones_like(probs)
        fp8 = getattr(self.config, "linear_fp8_recipe", None)
        if not getattr(self.config, "fp8_routed_experts", True):
            fp8 = None
        out = expert_mlp(x, probs, self.fc1_weight, self.fc2_weight, tokens_per_expert, fp8=fp8,
                         recompute=getattr(self.config, "recompute_experts", False))
        return out, None

    def backward_dw(self) -> None:
        """Weight gradients are computed in the backward pass (delay_wgrad_compute is refused)."""

    # -- plain state dict: SequentialMLP's names -----------------------------------------------

    def _expert_key(self, prefix: str, e: int, projection: str, leaf: str = "weight") -> str:
        return f"{prefix}local_experts.{e}.{projection}.{leaf}"

    def _stacked(self) -> List[Tuple[str, torch.nn.Parameter]]:
        return [(name, weight) for (name, _), weight in
                zip(_PROJECTIONS, (self.fc1_weight, self.fc2_weight))]

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """SequentialMLP's per-expert tensors (what conversion tools and plain checkpoints read).
        With keep_vars=True, the parameters themselves under their own names instead: megatron's
        default sharded path (a ModuleList above this module, as in the MTP block) builds
        tensors from `state_dict(keep_vars=True)` and then replaces them by dict key with this
        module's sharded_state_dict, whose keys are the parameter names."""
        if keep_vars:
            destination[prefix + "fc1_weight"] = self.fc1_weight
            destination[prefix + "fc2_weight"] = self.fc2_weight
            return
        for e in range(self.num_local_experts):
            for projection, weight in self._stacked():
                destination[self._expert_key(prefix, e, projection)] = weight.detach()[e]
                destination[self._expert_key(prefix, e, projection, "_extra_state")] = None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        """Loads SequentialMLP's per-expert names, or the stacked parameter names (what a
        dist_checkpointing load of `sharded_state_dict` returns)."""
        used = set()
        for projection, weight in self._stacked():
            stacked_key = prefix + _param_name(weight, self)
            expert_keys = [self._expert_key(prefix, e, projection)
                           for e in range(self.num_local_experts)]
            used.update(self._expert_key(prefix, e, projection, "_extra_state")
                        for e in range(self.num_local_experts))
            if stacked_key in state_dict:
                sources = [(weight, state_dict[stacked_key], stacked_key)]
                used.add(stacked_key)
            elif all(k in state_dict for k in expert_keys):
                sources = [(weight[e], state_dict[k], k) for e, k in enumerate(expert_keys)]
                used.update(expert_keys)
            else:
                missing_keys.extend(k for k in expert_keys if k not in state_dict)
                continue
            for target, value, key in sources:
                if tuple(value.shape) != tuple(target.shape):
                    error_msgs.append(f"size mismatch for {key}: copying a param with shape "
                                      f"{tuple(value.shape)}, the model's is "
                                      f"{tuple(target.shape)}.")
                    continue
                with torch.no_grad():
                    target.copy_(value)
        if strict:
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in used)

    # -- sharded state dict: SequentialMLP's checkpoint keys -----------------------------------

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: Optional[dict] = None) -> dict:
        """One ShardedTensorFactory per stacked weight (its data is the parameter), building
        exactly the per-expert entries SequentialMLP.sharded_state_dict saves, plus the
        experts' `_extra_state` objects."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        sharded = {}
        for (projection, tp_axis), weight in zip(_PROJECTIONS, (self.fc1_weight, self.fc2_weight)):
            def expert_entry(e: int, tensor: Tensor, leaf: str, projection=projection,
                             tp_axis=tp_axis):
                return self._expert_entry(prefix, sharded_offsets, metadata, e, projection,
                                          tp_axis, tensor, leaf)

            first = expert_entry(0, weight[0], "weight")
            sharded[prefix + _param_name(weight, self)] = ShardedTensorFactory(
                first.key, weight,
                _stacked_build_fn(prefix, first.key, self.num_local_experts, expert_entry),
                _stacked_merge_fn(projection == "linear_fc1"),
                first.replica_id,
            )
            for e in range(self.num_local_experts):
                sharded[self._expert_key(prefix, e, projection, "_extra_state")] = expert_entry(
                    e, None, "_extra_state")
        return sharded

    def _expert_entry(self, prefix, sharded_offsets, metadata, e, projection, tp_axis, tensor,
                      leaf):
        """What SequentialMLP's expert `e` puts into the sharded state dict for
        `{projection}.{leaf}` (leaf "weight" or "_extra_state"), with `tensor` as its data."""
        num_global = self.ep_group.size() * self.num_local_experts
        global_index = self.ep_group.rank() * self.num_local_experts + e
        local_prefix = f"{prefix}local_experts.{e}."
        if (metadata or {}).get("singleton_local_shards", False):
            sharded_prefix, offsets = f"{prefix}experts.{global_index}.", sharded_offsets
        else:
            sharded_prefix = f"{prefix}experts."
            offsets = (*sharded_offsets, (len(sharded_offsets), global_index, num_global))
        entries = make_sharded_tensors_for_checkpoint(
            {leaf: tensor}, f"{local_prefix}{projection}.", {"weight": tp_axis, "bias": tp_axis},
            offsets, tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"],
        )
        entry = entries[f"{local_prefix}{projection}.{leaf}"]
        if leaf == "weight" and projection == "linear_fc1":  # SwiGLU: gate and up halves
            entry = apply_swiglu_sharded_factory(
                entry, offsets, metadata.get("singleton_local_shards", False)
            )
        replace_prefix_for_sharding({"entry": entry}, local_prefix, sharded_prefix)
        entry.replica_id = (*entry.replica_id[:2], self.dp_group.rank())
        return entry


def _param_name(weight: torch.nn.Parameter, module: torch.nn.Module) -> str:
    return "fc1_weight" if weight is module.fc1_weight else "fc2_weight"


def _stacked_build_fn(prefix: str, model_key: str, num_experts: int, expert_entry: Callable):
    """build_fn of a stacked weight's factory: the per-expert entries of `t` (the parameter, or
    an optimizer state of its shape). The key it is called with is the factory's key after
    whatever was done to it since (the optimizer prefixes it; a pipeline stage's block renames
    its layers' prefixes): every expert's key gets the same part before this module's own."""
    tail = model_key[len(prefix):]

    def build(key: str, t: Tensor, replica_id, flattened_range):
        if flattened_range is not None:
            raise NotImplementedError(
                "GroupedExperts weights do not support flattened (dp_reshardable) optimizer "
                "checkpoints; save the distributed optimizer as 'fully_reshardable'."
            )
        if not key.endswith(tail):
            raise ValueError(f"factory key {key!r} does not end with {tail!r}")
        base = key[: len(key) - len(tail)]
        built = []
        for e in range(num_experts):
            entry = expert_entry(e, t[e], "weight")
            entry.key = base + entry.key[len(prefix):]
            entry.replica_id = replica_id
            built.append(entry.build() if isinstance(entry, ShardedTensorFactory) else entry)
        return built

    return build


def _stacked_merge_fn(swiglu: bool):
    def merge(loaded: list) -> Tensor:
        with torch.no_grad():
            return torch.stack([torch.cat(t) if swiglu else t for t in loaded])

    return merge


def _check_supported(config) -> None:
    if not (config.gated_linear_unit and config.activation_func is F.silu
            and config.activation_func_clamp_value is None and config.glu_linear_offset == 0):
        raise ValueError("GroupedExperts runs SwiGLU experts (gated_linear_unit with "
                         "activation_func=F.silu, no clamp or offset); use megatron's "
                         "SequentialMLP for other activations.")
    unsupported = {
        "add_bias_linear": "expert biases",
        "fp8": "Transformer Engine FP8 (compute.fp8 selects linear_fp8_recipe instead)",
        "fp4": "FP4 experts",
        "delay_wgrad_compute": "delayed weight gradients",
        "use_te_activation_func": "Transformer Engine activations",
        "moe_latent_size": "MoE latent projections",
    }
    for field, what in unsupported.items():
        if getattr(config, field, None):
            raise ValueError(f"GroupedExperts does not support {what} ({field}="
                             f"{getattr(config, field)!r}); use megatron's SequentialMLP.")
