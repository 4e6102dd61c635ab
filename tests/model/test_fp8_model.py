"""The hybrid model with FP8 linear layers (compute.fp8): same parameters and checkpoint keys as
the bf16 model, training that tracks it, and tensor parallelism wired through megatron's
communication (CPU: the FP8 GEMMs run as dequantise-and-matmul references)."""

import os

import pytest

from ring_train.config.compute import ComputeConfig
from ring_train.config.model import load_model_config
from ring_train.config.parallel import ParallelConfig
from ring_train.model.builder import build_model
from ring_train.model.transformer_config import to_transformer_config
from ring_train.parallel.distributed import destroy_distributed, init_distributed
from ring_train.testing.multiprocess import run_ranks
from tests.model.hybrid_layouts import Layout, train

# e4m3 keeps 3 mantissa bits: a GEMM's relative error is ~4e-2 on random data, and the loss
# averages over tokens, so FP8 and fp32 losses agree to well under that.
LOSS_RTOL = 2e-2
FP8 = ComputeConfig(fp8="blockwise")


def _train_on_reference_kernels(rank, layout, probe=None):
    """`train` with the FP8 quantisers' PyTorch references: the Triton kernels have their own
    interpreter tests, and interpreting them inside a model would only make this test slow."""
    os.environ["TRITON_INTERPRET"] = "0"
    return train(rank, layout, probe=probe)


def _tiny_model(compute: ComputeConfig):
    init_distributed()
    try:
        config = to_transformer_config(load_model_config("tiny"), ParallelConfig(), compute=compute)
        return build_model(load_model_config("tiny"), config)
    finally:
        destroy_distributed()



def _linear_classes_by_role(rank):
    """Class names of the routed-expert and of the other linear layers of the tiny FP8 model
    whose routed experts stay in bf16."""
    model = _tiny_model(ComputeConfig(fp8="blockwise", fp8_routed_experts=False))
    routed, other = set(), set()
    for name, m in model.named_modules():
        if name.endswith(("linear_qkvg", "linear_qkv", "linear_proj", "linear_fc1",
                          "linear_fc2")):
            (routed if ".local_experts." in name else other).add(type(m).__name__)
    return sorted(routed), sorted(other)


def test_routed_experts_can_stay_in_bf16_under_fp8():
    routed, other = run_ranks(_linear_classes_by_role, 1, timeout=120)[0]
    assert routed == ["ColumnParallelLinear", "RowParallelLinear"]
    assert other == ["Fp8ColumnParallelLinear", "Fp8RowParallelLinear"]


def test_fp8_model_has_the_bf16_model_parameters():
    fp8, reference = run_ranks(_keys_and_classes, 1, timeout=120)[0]
    assert fp8["keys"] == reference["keys"]
    assert fp8["linears"] and all(name.startswith("Fp8") for name in fp8["linears"])
    assert not any(name.startswith("Fp8") for name in reference["linears"])


def _keys_and_classes(rank):
    out = []
    for compute in (FP8, ComputeConfig()):
        model = _tiny_model(compute)
        linears = sorted({type(m).__name__ for name, m in model.named_modules()
                          if name.endswith(("linear_qkvg", "linear_qkv", "linear_proj",
                                            "linear_fc1", "linear_fc2"))})
        out.append({"keys": sorted(model.state_dict()), "linears": linears})
    return out


@pytest.fixture(scope="module")
def fp32_history():
    return run_ranks(train, 1, Layout(), timeout=300)[0]


@pytest.mark.parametrize("recipe", ["blockwise", "rowwise", "tensorwise", "tensorwise_delayed"])
def test_fp8_training_tracks_full_precision(fp32_history, recipe):
    history = run_ranks(_train_on_reference_kernels, 1, Layout(compute=ComputeConfig(fp8=recipe)),
                        timeout=300)[0]
    for (loss, _), (ref_loss, _) in zip(history, fp32_history):
        assert abs(loss - ref_loss) <= LOSS_RTOL * ref_loss, (history, fp32_history)
    # Quantisation really happened: the losses are not the fp32 ones.
    assert history[0][0] != fp32_history[0][0]


def _delayed_scaling_states(chunks):
    """Per FP8 linear layer: (recipe, id of its DelayedScaling, input and gradient quantisations
    recorded)."""
    states = []
    for chunk in chunks:
        for m in chunk.modules():
            if type(m).__name__.startswith("Fp8"):
                recipe, delayed = m.__dict__["_fp8_delayed"]
                states.append((recipe, id(delayed), delayed.input.recorded,
                               delayed.grad.recorded))
    return states


def _train_probing_delayed_scaling(rank, layout):
    return _train_on_reference_kernels(rank, layout, probe=_delayed_scaling_states)


def test_delayed_scaling_keeps_one_history_per_layer_across_steps():
    layout = Layout(compute=ComputeConfig(fp8="tensorwise_delayed"))
    _, states = run_ranks(_train_probing_delayed_scaling, 1, layout, timeout=300)[0]
    assert states and len({s[1] for s in states}) == len(states)  # one state per layer
    # 3 steps x 4 micro-batches, each quantising every layer's input and output gradient once.
    assert all(s[0] == "tensorwise_delayed" and s[2:] == (12, 12) for s in states), states


@pytest.mark.slow
def test_fp8_under_tp2_sequence_parallel_tracks_one_process(fp32_history):
    # Under TP the row-parallel layers quantise a rank's slice of K, so FP8 results differ from
    # one process by quantisation noise, not bitwise; broken communication would differ by O(1).
    histories = run_ranks(_train_on_reference_kernels, 2, Layout(tp=2, compute=FP8), timeout=600)
    for history in histories:
        for (loss, _), (ref_loss, _) in zip(history, fp32_history):
            assert abs(loss - ref_loss) <= LOSS_RTOL * ref_loss, (history, fp32_history)
