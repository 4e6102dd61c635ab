"""HF <-> framework weight layouts: bit-exact round trips and the documented row orders."""

import pytest
import torch

from ring_train.checkpoint.hf_config import model_config_from_hf, model_config_to_hf
from ring_train.checkpoint.hf_layout import (
    hf_to_megatron,
    lightning_qkvg_to_megatron,
    megatron_to_hf,
    softmax_qkv_to_megatron,
)
from tests.reference.hf_checkpoint import random_hf_state_dict, tiny_ling_config, tiny_ring_config


@pytest.mark.parametrize(
    "hf_config",
    [tiny_ling_config(), tiny_ring_config(), tiny_ring_config(num_nextn_predict_layers=1)],
    ids=["ling", "ring", "ring-mtp"],
)
def test_hf_round_trip_is_bit_exact(hf_config):
    cfg = model_config_from_hf(hf_config)
    hf = random_hf_state_dict(hf_config, dtype=torch.bfloat16, seed=1)
    back = megatron_to_hf(hf_to_megatron(hf, cfg), cfg)
    assert back.keys() == hf.keys()
    for name, tensor in hf.items():
        assert torch.equal(back[name], tensor), name


def test_hf_config_round_trip():
    for hf_config in (tiny_ling_config(), tiny_ring_config()):
        cfg = model_config_from_hf(hf_config)
        assert model_config_from_hf(model_config_to_hf(cfg)) == cfg


def test_softmax_qkv_rows_are_grouped_per_kv_head():
    cfg = model_config_from_hf(tiny_ling_config())  # H=4, KV=2, D=16
    h, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    # Row r of the HF weight holds the value r, so the new order is readable.
    w = torch.arange((h + 2 * kv) * d).float().unsqueeze(1)
    rows = softmax_qkv_to_megatron(w, cfg)[::d, 0].long().tolist()
    q, k, v = 0, h * d, (h + kv) * d
    assert rows == [q, q + d, k, v, q + 2 * d, q + 3 * d, k + d, v + d]


def test_lightning_rows_are_q_k_v_gate_per_head():
    cfg = model_config_from_hf(tiny_ring_config())
    h, d = cfg.num_attention_heads, cfg.head_dim
    qkv = torch.arange(3 * h * d).float().unsqueeze(1)
    gate = 1000 + torch.arange(h * d).float().unsqueeze(1)
    rows = lightning_qkvg_to_megatron(qkv, gate, cfg)[::d, 0].long().tolist()
    assert rows[:4] == [0, h * d, 2 * h * d, 1000]
    assert rows[4:8] == [d, h * d + d, 2 * h * d + d, 1000 + d]
