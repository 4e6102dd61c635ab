"""Ling-2.0 -> hybrid conversion on the weight layout (ARCH_SPEC §4.3): lightning layers get
MHA K/V rows in which query head h keeps its source partner h // (H/KV), a fresh gate and
g_norm of ones; everything else is the source, bit for bit."""

import re

import torch

from ring_train.checkpoint.hf_config import model_config_from_hf
from ring_train.checkpoint.ling_to_ring import GateInit, gqa_qkv_to_mha, ring_linear_tensors
from tests.conversion.conftest import HYBRID
from tests.reference.hf_checkpoint import tiny_ling_config

LIGHTNING_LAYERS = (0, 2)  # of the 4-layer source with layer_group_size 2
NEW_OR_CHANGED = ("attention.query_key_value.weight", "attention.g_proj.weight", "attention.g_norm.weight")


def _heads(rows: torch.Tensor, head_dim: int) -> torch.Tensor:
    return rows.view(-1, head_dim, rows.shape[-1])


def test_each_query_head_keeps_its_source_kv_head():
    cfg = model_config_from_hf(tiny_ling_config())  # H=4, KV=2, D=16
    h, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    # Row r holds the value r, so every output row says where it came from.
    qkv = torch.arange((h + 2 * kv) * d).float().unsqueeze(1)
    rows = gqa_qkv_to_mha(qkv, cfg)[::d, 0].long().tolist()
    q, k, v = 0, h * d, (h + kv) * d
    assert rows == [q, q + d, q + 2 * d, q + 3 * d, k, k, k + d, k + d, v, v, v + d, v + d]


def test_hybrid_keeps_source_tensors_bit_identical(ling_fp32, hybrid_hf):
    assert set(ling_fp32.state) < set(hybrid_hf.state)
    for name, tensor in ling_fp32.state.items():
        match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
        if match and int(match[1]) in LIGHTNING_LAYERS and match[2] in NEW_OR_CHANGED:
            continue
        assert torch.equal(hybrid_hf.state[name], tensor), name
        assert hybrid_hf.state[name].dtype == tensor.dtype, name


def test_lightning_kv_rows_repeat_source_kv_heads(ling_fp32, hybrid_hf):
    h, kv, d = (ling_fp32.config[k] for k in ("num_attention_heads", "num_key_value_heads", "head_dim"))
    for layer in LIGHTNING_LAYERS:
        name = f"model.layers.{layer}.attention.query_key_value.weight"
        q, k, v = ling_fp32.state[name].split([h * d, kv * d, kv * d])
        mha = _heads(hybrid_hf.state[name], d)
        assert mha.shape[0] == 3 * h
        assert torch.equal(mha[:h], _heads(q, d))
        for head in range(h):
            partner = head // (h // kv)
            assert torch.equal(mha[h + head], _heads(k, d)[partner]), (layer, head)
            assert torch.equal(mha[2 * h + head], _heads(v, d)[partner]), (layer, head)


def test_new_gate_and_norm_follow_the_gate_init(hybrid_hf):
    gates = [hybrid_hf.state[f"model.layers.{l}.attention.g_proj.weight"] for l in LIGHTNING_LAYERS]
    for layer, gate in zip(LIGHTNING_LAYERS, gates):
        assert abs(gate.std().item() - HYBRID.gate.std) < 0.2 * HYBRID.gate.std
        assert torch.equal(hybrid_hf.state[f"model.layers.{layer}.attention.g_norm.weight"],
                           torch.ones(gate.shape[0]))
    assert not torch.equal(gates[0], gates[1])  # seeded per layer


def test_zero_gate_init_and_softmax_layers_pass_through():
    cfg = model_config_from_hf(tiny_ling_config(), layer_group_size=2, group_norm_size=2)
    read = lambda name: torch.full((3,), 5.0)
    get = ring_linear_tensors(read, cfg, GateInit("zero"))
    gate = get("model.layers.0.attention.g_proj.weight")
    assert gate.shape == (cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size)
    assert not gate.any()
    assert torch.equal(get("model.layers.1.attention.query_key_value.weight"), read(""))
