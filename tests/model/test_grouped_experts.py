"""GroupedExperts is SequentialMLP: same outputs and gradients (fp32, < 1e-6 relative), same
initial weights for a seed, same state-dict names, same checkpoint entries, and checkpoints
(model and distributed-optimizer state) written by either load into the other. The tiny hybrid
model with `compute.grouped_experts` trains like the one with megatron's SequentialMLP, in one
process and under EP=2 on gloo.
"""

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories
from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
from megatron.core.transformer.transformer_config import TransformerConfig

import ring_train.model.experts as experts_module
from ring_train.config.compute import ComputeConfig
from ring_train.model.experts import GroupedExperts
from ring_train.model.router import FusedTopKRouter
from ring_train.testing.multiprocess import run_ranks
from tests.kernels.kernel_testing import rel_err
from tests.model import hybrid_layouts
from tests.model.hybrid_layouts import Layout

TOL = 1e-6
E, D, FFN = 4, 16, 8
SUBMODULES = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)


def config(**overrides):
    fields = dict(num_layers=1, hidden_size=D, num_attention_heads=2, ffn_hidden_size=32,
                  num_moe_experts=E, moe_ffn_hidden_size=FFN, moe_router_topk=2,
                  gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
                  use_cpu_initialization=True)
    fields.update(overrides)
    return TransformerConfig(**fields)


def pair(num_experts=E, seed=0, num_global=None, **overrides):
    """(SequentialMLP, GroupedExperts) of num_experts local experts, built from the same seed."""
    cfg = config(num_moe_experts=num_global or num_experts, **overrides)
    torch.manual_seed(seed)
    sequential = SequentialMLP(num_experts, cfg, SUBMODULES, get_default_pg_collection())
    torch.manual_seed(seed)
    grouped = GroupedExperts(num_experts, cfg, SUBMODULES, get_default_pg_collection())
    return sequential, grouped


def run(module, x, tokens_per_expert, probs, d_out):
    x, probs = x.clone().requires_grad_(True), probs.clone().requires_grad_(True)
    out, bias = module(x, tokens_per_expert, probs)
    assert bias is None
    out.backward(d_out)
    if isinstance(module, GroupedExperts):  # its state-dict tensors view stacked parameters
        grads = {f"local_experts.{e}.linear_fc{i}.weight": w.grad[e]
                 for e in range(module.num_local_experts)
                 for i, w in ((1, module.fc1_weight), (2, module.fc2_weight))}
    else:
        grads = {n: p.grad for n, p in module.named_parameters()}
    return out, x.grad, probs.grad, grads


def check_same(sequential, grouped, counts, seed=1):
    g = torch.Generator().manual_seed(seed)
    M = sum(counts)
    x, d_out = torch.randn(M, D, generator=g), torch.randn(M, D, generator=g)
    probs = torch.rand(M, generator=g)
    tokens_per_expert = torch.tensor(counts)  # CPU, as megatron's dispatchers hand it over
    want = run(sequential, x, tokens_per_expert, probs, d_out)
    got = run(grouped, x, tokens_per_expert, probs, d_out)
    for a, b in zip(got[:3], want[:3]):
        assert rel_err(a, b) < TOL
    assert got[3].keys() == want[3].keys()
    for name in want[3]:
        if want[3][name].abs().max() == 0:  # an expert without tokens
            assert (got[3][name] == 0).all(), name
        else:
            assert rel_err(got[3][name], want[3][name]) < TOL, name


def test_outputs_and_grads_equal_sequential_mlp(single_process):
    sequential, grouped = pair()
    check_same(sequential, grouped, [5, 0, 9, 3])  # expert 1 gets no tokens


def test_single_expert_and_empty_input(single_process):
    check_same(*pair(num_experts=1), [7])
    sequential, grouped = pair()
    check_same(sequential, grouped, [0, 0, 0, 0])


def test_probs_on_input_and_expert_recompute(single_process, monkeypatch):
    check_same(*pair(moe_router_topk=1, moe_apply_probs_on_input=True,
                    moe_router_score_function="sigmoid"), [2, 4, 1, 3])
    sequential, grouped = pair()
    grouped.config.recompute_experts = True  # the HybridTransformerConfig field
    calls = []
    real = experts_module.expert_mlp
    monkeypatch.setattr(experts_module, "expert_mlp",
                        lambda *a, **k: calls.append(k["recompute"]) or real(*a, **k))
    check_same(sequential, grouped, [4, 2, 0, 6])
    assert calls == [True]


@pytest.mark.parametrize("routed_fp8", [True, False])
def test_fp8_recipe_reaches_the_routed_experts_unless_kept_in_bf16(single_process, routed_fp8):
    """compute.fp8_routed_experts=false keeps the grouped experts' GEMMs in bf16 (the exact
    outputs of no FP8 recipe) while the recipe is on; true runs them in FP8."""
    sequential, grouped = pair()
    g = torch.Generator().manual_seed(3)
    x, probs, counts = torch.randn(12, D, generator=g), torch.rand(12, generator=g), [5, 0, 4, 3]
    plain, _ = grouped(x, torch.tensor(counts), probs)
    grouped.config.linear_fp8_recipe = "blockwise"  # the HybridTransformerConfig fields
    grouped.config.fp8_routed_experts = routed_fp8
    out, _ = grouped(x, torch.tensor(counts), probs)
    assert torch.equal(out, plain) != routed_fp8
    assert rel_err(out, plain) < 0.1


@pytest.mark.gpu
@pytest.mark.parametrize("num_experts", [256, 32])
def test_ring_mini_shapes_on_gpu(single_process, num_experts):
    """bf16 torch._grouped_mm against SequentialMLP (< 1e-2: bf16 rounding in different
    places), an expert without tokens included (its gradient exactly zero)."""
    sequential, grouped = pair(num_experts=num_experts, hidden_size=2048,
                               moe_ffn_hidden_size=512, ffn_hidden_size=512,
                               num_attention_heads=16, params_dtype=torch.bfloat16,
                               use_cpu_initialization=False)  # drawn on the GPU
    grouped.load_state_dict(sequential.state_dict())
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = 8192 * 8 if num_experts == 256 else 8192
    expert = torch.randint(1, num_experts, (rows,), generator=g, device="cuda").sort().values
    counts = torch.bincount(expert, minlength=num_experts)  # expert 0 gets no tokens
    x = torch.randn(rows, 2048, generator=g, device="cuda").bfloat16()
    probs = torch.rand(rows, generator=g, device="cuda")
    d_out = torch.randn(rows, 2048, generator=g, device="cuda").bfloat16()
    want = run(sequential, x, counts.cpu(), probs, d_out)
    got = run(grouped, x, counts, probs, d_out)  # device counts: no host sync
    for a, b in zip(got[:3], want[:3]):
        assert rel_err(a, b) < 1e-2
    for name in want[3]:
        if name.startswith("local_experts.0."):
            assert (got[3][name] == 0).all(), name
        else:
            assert rel_err(got[3][name], want[3][name]) < 1e-2, name


def test_params_are_expert_params_as_in_sequential_mlp(single_process):
    sequential, grouped = pair()
    attrs = ("allreduce", "tensor_model_parallel", "partition_stride")
    fc1 = sequential.local_experts[0].linear_fc1.weight
    fc2 = sequential.local_experts[0].linear_fc2.weight
    for mine, theirs in ((grouped.fc1_weight, fc1), (grouped.fc2_weight, fc2)):
        assert all(getattr(mine, a) == getattr(theirs, a) for a in attrs)
        assert mine.partition_dim == theirs.partition_dim + 1  # after the expert axis


def test_expert_tensor_parallelism_is_refused(single_process):
    groups = copy.copy(get_default_pg_collection())
    groups.expt_tp = type("Group", (), {"size": lambda self: 2, "rank": lambda self: 0})()
    with pytest.raises(ValueError, match="expert_tensor_parallel_size = 1"):
        GroupedExperts(E, config(), SUBMODULES, groups)


def test_state_dict_is_sequential_mlps_both_ways(single_process):
    sequential, grouped = pair()
    want, got = sequential.state_dict(), grouped.state_dict()
    assert list(got) == list(want)  # names, order, and the `_extra_state` entries
    for name, value in want.items():
        if value is None:  # `_extra_state`
            assert got[name] is None
        else:
            assert torch.equal(got[name], value)
    other_seq, other_grp = pair(seed=5)
    other_grp.load_state_dict(sequential.state_dict(), strict=True)
    other_seq.load_state_dict(grouped.state_dict(), strict=True)
    for name, value in want.items():
        if value is not None:
            assert torch.equal(other_grp.state_dict()[name], value)
            assert torch.equal(other_seq.state_dict()[name], value)


def flat_entries(module, singleton=False, prefix="decoder.layers.3.mlp.experts."):
    metadata = {"singleton_local_shards": True} if singleton else None
    sharded = module.sharded_state_dict(prefix, ((0, 3, 8),), metadata)
    # what a pipeline stage's block does: its local layer 3 is global layer 7
    replace_prefix_for_sharding(sharded, "decoder.layers.3.", "decoder.layers.7.")
    apply_factories(sharded)
    entries = {}
    for v in nested_values(sharded):
        key = (v.key, v.global_offset)
        assert key not in entries
        if isinstance(v, ShardedTensor):
            entries[key] = (v.global_shape, v.axis_fragmentations, v.replica_id,
                            v.prepend_axis_num, v.data.clone())
        else:
            entries[key] = (v.global_shape, v.replica_id, v.data)
    return entries


@pytest.mark.parametrize("singleton", [False, True], ids=["expert-axis", "singleton-shards"])
def test_checkpoint_entries_are_sequential_mlps(single_process, singleton):
    sequential, grouped = pair()
    want, got = flat_entries(sequential, singleton), flat_entries(grouped, singleton)
    assert got.keys() == want.keys() and len(want) == 5 * E  # fc1 gate, up; fc2; 2 extra states
    for key in want:
        for a, b in zip(got[key], want[key]):
            assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, key


@pytest.mark.parametrize("direction", ["sequential->grouped", "grouped->sequential"])
def test_dist_checkpoint_round_trip(single_process, tmp_path, direction):
    sequential, grouped = pair(seed=0)
    fresh_seq, fresh_grp = pair(seed=9)
    saved, loaded_into = (sequential, fresh_grp) if direction.startswith("seq") else \
        (grouped, fresh_seq)
    prefix = "decoder.layers.3.mlp.experts."
    dist_checkpointing.save(saved.sharded_state_dict(prefix), str(tmp_path))
    loaded = dist_checkpointing.load(loaded_into.sharded_state_dict(prefix), str(tmp_path))
    loaded_into.load_state_dict({k[len(prefix):]: v for k, v in loaded.items()}, strict=True)
    for name, value in saved.state_dict().items():
        if value is not None:
            assert torch.equal(loaded_into.state_dict()[name], value), name


def save_under_ep2(rank, directory):
    """Rank `rank` of EP=2 (4 local experts of 8): its entries are SequentialMLP's, and it saves
    GroupedExperts' checkpoint; returns its experts' weights by global index."""
    from ring_train.parallel.distributed import destroy_distributed, init_distributed

    init_distributed(expert_parallel=2)
    sequential, grouped = pair(num_global=2 * E, seed=rank)
    want, got = flat_entries(sequential), flat_entries(grouped)
    assert got.keys() == want.keys()
    for key in want:
        for a, b in zip(got[key], want[key]):
            assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, key
    dist_checkpointing.save(grouped.sharded_state_dict("experts."), directory)
    weights = {rank * E + e: (grouped.fc1_weight[e].detach().clone(),
                              grouped.fc2_weight[e].detach().clone()) for e in range(E)}
    destroy_distributed()
    return weights


def test_ep2_checkpoint_loads_into_one_process_sequential_mlp(single_process, tmp_path):
    saved = {}
    for weights in run_ranks(save_under_ep2, 2, str(tmp_path), timeout=300):
        saved.update(weights)
    sequential, _ = pair(num_experts=2 * E, seed=7)
    loaded = dist_checkpointing.load(sequential.sharded_state_dict("experts."), str(tmp_path))
    sequential.load_state_dict({k[len("experts."):]: v for k, v in loaded.items()}, strict=True)
    for g, (fc1, fc2) in saved.items():
        assert torch.equal(sequential.local_experts[g].linear_fc1.weight, fc1)
        assert torch.equal(sequential.local_experts[g].linear_fc2.weight, fc2)


# -- the model ------------------------------------------------------------------------------


GROUPED = ComputeConfig(grouped_experts=True)


def train_grouped(rank, layout, steps=3):
    return hybrid_layouts.train(rank, dataclasses.replace(layout, compute=GROUPED), steps)


def train_sequential(rank, layout, steps=3):
    return hybrid_layouts.train(rank, layout, steps)


def close(history, reference, tol=1e-6):
    for (loss, norm), (ref_loss, ref_norm) in zip(history, reference):
        assert abs(loss - ref_loss) <= tol * abs(ref_loss), (history, reference)
        assert abs(norm - ref_norm) <= tol * abs(ref_norm), (history, reference)


@pytest.mark.slow
def test_tiny_model_trains_as_with_sequential_mlp_single_process_and_ep2():
    reference = run_ranks(train_sequential, 1, Layout(), timeout=300)[0]
    close(run_ranks(train_grouped, 1, Layout(), timeout=300)[0], reference)
    for history in run_ranks(train_grouped, 2, Layout(ep=2), timeout=300):
        close(history, reference)


def build_trainer(grouped: bool):
    """The tiny model (SequentialMLP or GroupedExperts) with Adam in the distributed optimizer."""
    from ring_train.config.model import load_model_config
    from ring_train.config.optim import OptimConfig
    from ring_train.config.parallel import ParallelConfig
    from ring_train.model.transformer_config import to_transformer_config
    from ring_train.testing.global_weights import fill_global_weights
    from ring_train.training.setup import build_model_chunks, build_optimizer, wrap_ddp

    model_cfg = load_model_config("tiny")
    cfg = to_transformer_config(model_cfg, ParallelConfig(),
                                compute=GROUPED if grouped else ComputeConfig())
    chunks = build_model_chunks(model_cfg, cfg)
    fill_global_weights(chunks)
    model = wrap_ddp(chunks, cfg, distributed_optimizer=True)
    optim = OptimConfig(optimizer="adam", lr=1e-3, weight_decay=0.1, clip_grad=1.0)
    return model, build_optimizer(model, optim, cfg, distributed_optimizer=True)


def test_model_checkpoint_entries_equal_sequential_models(single_process):
    """The whole tiny model (MTP included: its block reads plain state dicts first) saves the
    same tensors (keys, global shapes, dtypes, values) and objects either way."""
    from ring_train.checkpoint.sharded_state import model_metadata, object_keys, tensor_shapes
    from ring_train.config.model import load_model_config
    from ring_train.config.parallel import ParallelConfig
    from ring_train.model.builder import build_model
    from ring_train.model.transformer_config import to_transformer_config
    from ring_train.testing.global_weights import fill_global_weights

    cfg = load_model_config("tiny")
    states = []
    for grouped in (False, True):
        compute = GROUPED if grouped else ComputeConfig()
        model = build_model(cfg, to_transformer_config(cfg, ParallelConfig(), compute=compute))
        fill_global_weights([model])
        sharded = model.sharded_state_dict(metadata=model_metadata())
        values = {}
        for t in nested_values(apply_factories(sharded) or sharded):
            if isinstance(t, ShardedTensor):
                values[(t.key, t.global_offset)] = t.data.detach().clone()
        states.append((tensor_shapes(model.sharded_state_dict(metadata=model_metadata())),
                       sorted(object_keys(sharded)), values))
    (shapes, objects, values), (g_shapes, g_objects, g_values) = states
    assert g_shapes == shapes and g_objects == objects
    assert g_values.keys() == values.keys()
    assert all(torch.equal(g_values[k], values[k]) for k in values)


@pytest.mark.parametrize("saver", ["grouped", "sequential"])
def test_distributed_optimizer_checkpoint_loads_across_expert_modules(single_process, tmp_path,
                                                                      saver):
    from ring_train.checkpoint.sharded_state import model_sharded_state, optimizer_sharded_state
    from ring_train.training.step import train_step

    batches = [hybrid_layouts.global_batch(step) for step in range(2)]
    model, optimizer = build_trainer(saver == "grouped")
    train_step(model, optimizer, batches[0])
    state = model_sharded_state(model)
    optimizer_state = optimizer_sharded_state(optimizer, state, False)
    dist_checkpointing.save({**state, "optimizer": optimizer_state}, str(tmp_path))
    expected = train_step(model, optimizer, batches[1])

    model, optimizer = build_trainer(saver != "grouped")
    grouped_modules = [m for m in model[0].modules() if isinstance(m, GroupedExperts)]
    assert bool(grouped_modules) == (saver != "grouped")
    state = model_sharded_state(model)
    template = {**state, "optimizer": optimizer_sharded_state(optimizer, state, True)}
    loaded = dist_checkpointing.load(template, str(tmp_path))
    model[0].module.load_state_dict(loaded["model0"], strict=True)
    optimizer.load_state_dict(loaded["optimizer"])
    resumed = train_step(model, optimizer, batches[1])
    assert abs(resumed.loss - expected.loss) <= 1e-6 * abs(expected.loss)
    assert abs(resumed.grad_norm - expected.grad_norm) <= 1e-6 * abs(expected.grad_norm)


def test_fused_router_in_the_model_matches_megatrons(single_process, monkeypatch):
    """The tiny model with GroupedExperts and the fused routing kernels on (Triton's interpreter on
    CPU) computes the loss and gradients of the megatron-spec model."""
    from ring_train.config.model import load_model_config
    from ring_train.config.parallel import ParallelConfig
    from ring_train.model.builder import build_model
    from ring_train.model.transformer_config import to_transformer_config
    from ring_train.testing.global_weights import fill_global_weights

    import kernels.moe_router as moe_router

    calls = []
    real = moe_router.sigmoid_topk_routing
    monkeypatch.setattr(moe_router, "sigmoid_topk_routing",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = load_model_config("tiny", num_nextn_predict_layers=0)
    tokens = torch.randint(0, cfg.vocab_size, (1, 48), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(48)[None]
    results = []
    for grouped in (False, True):
        model = build_model(cfg, to_transformer_config(cfg, ParallelConfig(
            moe_token_dispatcher="allgather"), compute=GROUPED if grouped else ComputeConfig()))
        fill_global_weights([model])
        routers = [m for m in model.modules() if isinstance(m, FusedTopKRouter)]
        assert len(routers) == cfg.num_hidden_layers - cfg.first_k_dense_replace
        for router in routers if grouped else ():  # the fused router alone, without the other fused kernels
            router.config = copy.copy(router.config)
            router.config.fused_kernels = True
        loss = model(tokens, positions, None, labels=tokens).float().mean()
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if "experts" not in n}
        results.append((loss.detach(), grads))
    assert len(calls) == cfg.num_hidden_layers - cfg.first_k_dense_replace  # the fused run's
    (want, want_grads), (got, got_grads) = results
    assert rel_err(got, want) < 1e-6
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        assert rel_err(got_grads[name], want_grads[name]) < 1e-5, name
