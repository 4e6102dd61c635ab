"""Checks of the HF reference model against facts that hold independently of its code.

Each test compares the reference with a second, differently written computation (parallel form of
the recurrence, brute-force routing, per-document runs, MHA with repeated KV heads) or with the
numbers quoted in ARCH_SPEC. Model-level comparisons run in float64 so that tolerances are tight.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.reference.hf_checkpoint import (
    INDEX_FILE,
    random_hf_state_dict,
    tiny_ling_config,
    tiny_ring_config,
    write_ling_checkpoint,
    write_ring_linear_checkpoint,
    load_hf_checkpoint,
)
from tests.reference.hf_models import (
    alibi_base_slopes,
    group_rms_norm,
    is_softmax_layer,
    layer_decay_factor,
    lightning_attention_recurrent,
    lightning_slopes,
    reference_logits,
    rms_norm,
    rope_cos_sin,
    route_tokens,
    softmax_attention,
)

F64 = torch.float64


def lightning_attention_parallel(q, k, v, slope, doc_id):
    """o_t = D^-0.5 sum_{s<=t, same document} lambda^(t-s) (q_t . k_s) v_s, as one masked matrix product."""
    head_dim = q.shape[-1]
    position = torch.arange(q.shape[1])
    distance = (position[:, None] - position[None, :]).to(q.dtype)  # [T,T] t - s
    visible = (distance >= 0) & (doc_id[:, None] == doc_id[None, :])
    decay = torch.exp(-slope[:, None, None] * distance.clamp(min=0)) * visible  # [H,T,T]
    scores = torch.einsum("bthd,bshd->bhts", q, k) * head_dim ** -0.5 * decay
    return torch.einsum("bhts,bshd->bthd", scores, v)


@pytest.mark.parametrize("doc_lengths", [[23], [7, 1, 15]], ids=["one_document", "three_documents"])
def test_recurrent_lightning_attention_equals_parallel_form(doc_lengths):
    generator = torch.Generator().manual_seed(0)
    batch, num_tokens, num_heads, head_dim = 2, sum(doc_lengths), 4, 8
    q, k, v = (torch.randn(batch, num_tokens, num_heads, head_dim, generator=generator, dtype=F64) for _ in range(3))
    slope = lightning_slopes(num_heads, layer_idx=1, num_layers=5)
    doc_id = torch.repeat_interleave(torch.arange(len(doc_lengths)), torch.tensor(doc_lengths))
    doc_start = torch.zeros(num_tokens, dtype=torch.bool)
    doc_start[torch.tensor([0] + doc_lengths[:-1]).cumsum(0)] = True

    recurrent = lightning_attention_recurrent(q, k, v, slope, doc_start)
    torch.testing.assert_close(recurrent, lightning_attention_parallel(q, k, v, slope, doc_id), rtol=0, atol=1e-12)


def test_base_slopes_are_alibi_powers_of_two():
    h = torch.arange(16, dtype=F64)
    torch.testing.assert_close(alibi_base_slopes(16), 2.0 ** (-8 * (h + 1) / 16), rtol=1e-14, atol=0)
    assert alibi_base_slopes(16)[[0, 1, 2, 15]].tolist() == pytest.approx([0.7071068, 0.5, 0.3535534, 0.00390625])
    assert alibi_base_slopes(32)[[0, 1, 31]].tolist() == pytest.approx([0.8408964, 0.7071068, 0.00390625])
    # Non-power-of-two H = 12: slopes(8) then every other slope of slopes(16), first 4 of them.
    expected_12 = [2.0 ** -(h + 1) for h in range(8)] + [2.0 ** (-0.5 * (2 * i + 1)) for i in range(4)]
    assert alibi_base_slopes(12).tolist() == pytest.approx(expected_12, rel=1e-12)


def test_layer_decay_factors_match_spec_numbers():
    # Ring-mini (L=20) and Ring-flash (L=32) values quoted in ARCH_SPEC §2.4.
    assert layer_decay_factor(0, 20, "A") == pytest.approx(1.00001, abs=1e-9)
    assert layer_decay_factor(18, 20, "A") == pytest.approx(0.0526, abs=1e-4)
    assert layer_decay_factor(0, 20, "B") == pytest.approx(1.0526, abs=1e-4)
    assert layer_decay_factor(18, 20, "B") == pytest.approx(0.1053, abs=1e-4)
    assert layer_decay_factor(30, 32, "A") == pytest.approx(0.0323, abs=1e-4)
    assert layer_decay_factor(30, 32, "B") == pytest.approx(0.0645, abs=1e-4)
    assert layer_decay_factor(0, 1, "A") == layer_decay_factor(0, 1, "B") == 1.0 + 1e-5
    # Example decays lambda = exp(-slope) for Ring-mini, variant A.
    decay_layer_0 = torch.exp(-lightning_slopes(16, 0, 20, "A"))
    assert decay_layer_0[0].item() == pytest.approx(0.493, abs=1e-3)
    assert decay_layer_0[15].item() == pytest.approx(0.9961, abs=1e-4)
    assert torch.exp(-lightning_slopes(16, 18, 20, "A"))[0].item() == pytest.approx(0.963, abs=1e-3)
    with pytest.raises(ValueError, match="decay_variant"):
        layer_decay_factor(0, 20, "C")


def test_decay_variant_changes_ring_linear_logits_only():
    input_ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    for config, variant_matters in ((tiny_ling_config(), False), (tiny_ring_config(), True)):
        state_dict = random_hf_state_dict(config)
        logits_a = reference_logits(config, state_dict, input_ids, decay_variant="A", dtype=F64)["logits"]
        logits_b = reference_logits(config, state_dict, input_ids, decay_variant="B", dtype=F64)["logits"]
        assert (not torch.equal(logits_a, logits_b)) == variant_matters


def test_softmax_layer_pattern_follows_layer_group_size_with_tail_layers():
    def softmax_layers(**overrides):
        config = tiny_ring_config(**overrides)
        return [l for l in range(config["num_hidden_layers"]) if is_softmax_layer(l, config)]

    assert softmax_layers(num_hidden_layers=20, layer_group_size=5) == [4, 9, 14, 19]  # Ring-mini
    assert softmax_layers(num_hidden_layers=32, layer_group_size=8) == [7, 15, 23, 31]  # Ring-flash
    assert softmax_layers(num_hidden_layers=5, layer_group_size=2) == [1, 3, 4]  # layer 4 is a tail layer
    assert softmax_layers(num_hidden_layers=4, layer_group_size=1) == [0, 1, 2, 3]
    ling = tiny_ling_config()
    assert all(is_softmax_layer(l, ling) for l in range(ling["num_hidden_layers"]))


def test_ring_linear_with_layer_group_size_1_gives_ling_logits():
    ling_config = tiny_ling_config(num_nextn_predict_layers=1)
    ring_config = tiny_ring_config(num_hidden_layers=ling_config["num_hidden_layers"], layer_group_size=1,
                                   group_norm_size=1, num_nextn_predict_layers=1)
    state_dict = random_hf_state_dict(ling_config)
    input_ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1))
    ling = reference_logits(ling_config, state_dict, input_ids)
    ring = reference_logits(ring_config, state_dict, input_ids)
    assert torch.equal(ling["logits"], ring["logits"])
    assert torch.equal(ling["mtp_logits"], ring["mtp_logits"])


@pytest.mark.parametrize("make_config", [tiny_ling_config, tiny_ring_config], ids=["ling", "ring_linear"])
def test_packed_documents_match_separate_runs(make_config):
    """Each packed document's logits equal a run of that document alone from position 0.

    The packed row uses positions 0..T-1, so a document starting at offset o sees positions o.. instead
    of 0..; q.k under RoPE depends only on position differences, in softmax and lightning attention
    alike, so the two agree to rounding. MTP logits are compared except at each document's last
    token, whose MTP input (the next token) lies outside the document by construction."""
    config = make_config(num_nextn_predict_layers=1)
    state_dict = random_hf_state_dict(config)
    doc_lengths = [6, 1, 9, 8]
    cu_seqlens = torch.tensor([0] + doc_lengths).cumsum(0)
    input_ids = torch.randint(0, 256, (1, sum(doc_lengths)), generator=torch.Generator().manual_seed(2))

    packed = reference_logits(config, state_dict, input_ids, cu_seqlens=cu_seqlens, dtype=F64)
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        alone = reference_logits(config, state_dict, input_ids[:, start:end], dtype=F64)
        torch.testing.assert_close(packed["logits"][:, start:end], alone["logits"], rtol=0, atol=1e-10)
        torch.testing.assert_close(packed["mtp_logits"][:, start:end - 1], alone["mtp_logits"][:, :-1],
                                   rtol=0, atol=1e-10)
    # Without cu_seqlens the later documents see the earlier ones, so the mask and state reset are doing work.
    unpacked = reference_logits(config, state_dict, input_ids, dtype=F64)
    assert not torch.allclose(unpacked["logits"][:, 7:], packed["logits"][:, 7:], atol=1e-6)


def test_logits_are_causal_and_mtp_reads_the_next_token():
    config = tiny_ring_config(num_nextn_predict_layers=1)
    state_dict = random_hf_state_dict(config)
    input_ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(3))
    changed_ids = input_ids.clone()
    changed_ids[0, 9] = (input_ids[0, 9] + 1) % 256
    before = reference_logits(config, state_dict, input_ids, dtype=F64)
    after = reference_logits(config, state_dict, changed_ids, dtype=F64)

    torch.testing.assert_close(after["logits"][:, :9], before["logits"][:, :9], rtol=0, atol=1e-12)
    assert (after["logits"][:, 9] - before["logits"][:, 9]).abs().max() > 1e-3
    # MTP at t reads the main stack at t and token t+1: positions up to 7 cannot see token 9, position 8 does.
    torch.testing.assert_close(after["mtp_logits"][:, :8], before["mtp_logits"][:, :8], rtol=0, atol=1e-12)
    assert (after["mtp_logits"][:, 8] - before["mtp_logits"][:, 8]).abs().max() > 1e-3


def brute_force_route(scores, expert_bias, config):
    """Per token, in plain Python: groups by sum of their top-2 biased scores, experts by biased score
    among kept groups, weights from unbiased scores normalised and scaled."""
    per_group = config["num_experts"] // config["n_group"]
    chosen, weights = [], []
    for token_scores in scores.tolist():
        biased = [s + b for s, b in zip(token_scores, expert_bias.tolist())]
        group_score = [sum(sorted(biased[g * per_group:(g + 1) * per_group])[-2:]) for g in range(config["n_group"])]
        kept = sorted(range(config["n_group"]), key=lambda g: -group_score[g])[:config["topk_group"]]
        candidates = [e for g in kept for e in range(g * per_group, (g + 1) * per_group)]
        experts = sorted(candidates, key=lambda e: -biased[e])[:config["num_experts_per_tok"]]
        total = sum(token_scores[e] for e in experts)
        chosen.append(experts)
        weights.append({e: token_scores[e] / total * config["routed_scaling_factor"] for e in experts})
    return chosen, weights


def test_group_limited_routing_matches_brute_force():
    config = tiny_ling_config()
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(64, 64, generator=generator, dtype=F64)
    gate_weight = torch.randn(config["num_experts"], 64, generator=generator, dtype=F64) * 0.1
    expert_bias = torch.randn(config["num_experts"], generator=generator, dtype=F64) * 0.1

    expert_idx, weights = route_tokens(x, gate_weight, expert_bias, config)
    chosen, expected_weights = brute_force_route(torch.sigmoid(x @ gate_weight.T), expert_bias, config)
    per_group = config["num_experts"] // config["n_group"]
    for token in range(x.shape[0]):
        assert sorted(expert_idx[token].tolist()) == sorted(chosen[token])
        assert len({e // per_group for e in chosen[token]}) <= config["topk_group"]
        for slot, expert in enumerate(expert_idx[token].tolist()):
            assert weights[token, slot].item() == pytest.approx(expected_weights[token][expert], rel=1e-12)
    torch.testing.assert_close(weights.sum(-1), torch.full((64,), 2.5, dtype=F64), rtol=1e-12, atol=0)


def test_expert_bias_steers_selection_but_not_weights():
    config = tiny_ling_config()
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(32, 64, generator=generator, dtype=F64)
    gate_weight = torch.randn(config["num_experts"], 64, generator=generator, dtype=F64) * 0.1
    scores = torch.sigmoid(x @ gate_weight.T)
    # The least-scored expert of token 0 gets a bias large enough to win it and its group everywhere.
    favoured = scores[0].argmin().item()
    expert_bias = torch.zeros(config["num_experts"], dtype=F64)
    expert_bias[favoured] = 10.0

    expert_idx, weights = route_tokens(x, gate_weight, expert_bias, config)
    assert (expert_idx == favoured).any(-1).all()
    slot = (expert_idx[0] == favoured).nonzero().item()
    unbiased_share = scores[0, favoured] / scores[0, expert_idx[0]].sum()
    assert weights[0, slot].item() == pytest.approx(2.5 * unbiased_share.item(), rel=1e-12)
    assert weights[0, slot] == weights[0].min()


def test_group_rms_norm_normalises_each_contiguous_group_alone():
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(3, 64, generator=generator, dtype=F64)
    weight = 1 + 0.1 * torch.randn(64, generator=generator, dtype=F64)
    scaled_first_group = x.clone()
    scaled_first_group[:, :32] *= 10.0  # group 0 of 2 is dims [0, 32)
    # eps = 0 makes each group exactly scale-invariant.
    torch.testing.assert_close(group_rms_norm(scaled_first_group, weight, 2, 0.0), group_rms_norm(x, weight, 2, 0.0))
    torch.testing.assert_close(group_rms_norm(x, weight, 1, 1e-6), rms_norm(x, weight, 1e-6))
    assert not torch.allclose(group_rms_norm(x, weight, 2, 1e-6), rms_norm(x, weight, 1e-6))


def test_gqa_attention_equals_mha_with_kv_heads_repeated_interleaved():
    """Query head h reads KV head h // (H/KV): the same attention as MHA whose K/V heads are each
    KV head repeated H/KV times consecutively (the Ling -> Ring linear-layer QKV conversion)."""
    config = tiny_ling_config()
    num_heads, num_kv_heads, head_dim, d = 4, 2, 16, 64
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(2, 9, d, generator=generator, dtype=F64)
    gqa = {
        "query_key_value.weight": torch.randn((num_heads + 2 * num_kv_heads) * head_dim, d, generator=generator,
                                              dtype=F64) * 0.1,
        "query_layernorm.weight": 1 + 0.1 * torch.randn(head_dim, generator=generator, dtype=F64),
        "key_layernorm.weight": 1 + 0.1 * torch.randn(head_dim, generator=generator, dtype=F64),
        "dense.weight": torch.randn(d, num_heads * head_dim, generator=generator, dtype=F64) * 0.1,
    }
    q, k, v = gqa["query_key_value.weight"].split([num_heads * head_dim, num_kv_heads * head_dim,
                                                   num_kv_heads * head_dim])
    repeat = num_heads // num_kv_heads
    mha_qkv = torch.cat([q] + [w.view(num_kv_heads, head_dim, d).repeat_interleave(repeat, 0).reshape(-1, d)
                               for w in (k, v)])
    mha = {**gqa, "query_key_value.weight": mha_qkv}
    rope = rope_cos_sin(9, config, F64)
    causal = torch.ones(9, 9, dtype=torch.bool).tril()

    torch.testing.assert_close(
        softmax_attention(x, gqa, config, rope, causal),
        softmax_attention(x, mha, {**config, "num_key_value_heads": num_heads}, rope, causal),
        rtol=0, atol=1e-12)


def test_tensor_names_and_shapes_follow_the_hf_layout():
    ring = random_hf_state_dict(tiny_ring_config(num_nextn_predict_layers=1))
    shapes = {name: tuple(t.shape) for name, t in ring.items()}
    # d=64, H=4, KV=2, D=16: linear qkv 3*H*D = 192 rows, softmax qkv (H+2KV)*D = 128 rows.
    assert shapes["model.layers.0.attention.query_key_value.weight"] == (192, 64)  # linear, dense FFN
    assert shapes["model.layers.0.attention.g_proj.weight"] == (64, 64)
    assert shapes["model.layers.0.attention.g_norm.weight"] == (64,)
    assert shapes["model.layers.0.mlp.gate_proj.weight"] == (128, 64)
    assert shapes["model.layers.2.attention.query_key_value.weight"] == (192, 64)  # linear, MoE
    assert shapes["model.layers.1.attention.query_key_value.weight"] == (128, 64)  # softmax
    assert "model.layers.1.attention.g_proj.weight" not in shapes
    assert shapes["model.layers.4.attention.query_key_value.weight"] == (128, 64)  # tail softmax layer
    assert shapes["model.layers.1.attention.query_layernorm.weight"] == (16,)
    assert shapes["model.layers.1.attention.dense.weight"] == (64, 64)
    assert shapes["model.layers.1.mlp.gate.weight"] == (16, 64)
    assert shapes["model.layers.1.mlp.gate.expert_bias"] == (16,)
    assert shapes["model.layers.1.mlp.experts.15.down_proj.weight"] == (64, 32)
    assert shapes["model.layers.1.mlp.shared_experts.up_proj.weight"] == (32, 64)
    assert shapes["model.layers.5.eh_proj.weight"] == (64, 128)  # MTP stored as layer L
    for norm in ("enorm", "hnorm", "final_layernorm", "input_layernorm"):
        assert shapes[f"model.layers.5.{norm}.weight"] == (64,)
    assert shapes["model.layers.5.attention.query_key_value.weight"] == (128, 64)
    assert shapes["model.word_embeddings.weight"] == shapes["lm_head.weight"] == (256, 64)
    # Per layer: 2 norms + 4 attention (+2 gate for linear) + dense 3 or MoE 2 + 16*3 + 3 shared;
    # plus 4 MTP-only tensors, embeddings, final norm and lm_head.
    dense_linear, moe_linear, moe_softmax = 2 + 6 + 3, 2 + 6 + 53, 2 + 4 + 53
    assert len(shapes) == dense_linear + moe_linear + 3 * moe_softmax + (moe_softmax + 4) + 3
    assert ring["model.layers.1.mlp.gate.expert_bias"].dtype == torch.float32
    assert ring["model.layers.1.mlp.gate.weight"].dtype == torch.bfloat16
    assert (ring["model.layers.1.mlp.gate.expert_bias"] != 0).all()
    assert (ring["model.norm.weight"] != 1).any()


@pytest.mark.parametrize("writer, make_config", [(write_ling_checkpoint, tiny_ling_config),
                                                 (write_ring_linear_checkpoint, tiny_ring_config)],
                         ids=["ling", "ring_linear"])
def test_checkpoint_round_trip_with_sharded_index(tmp_path, writer, make_config):
    config = make_config(num_nextn_predict_layers=1)
    written = writer(tmp_path, config, num_shards=3)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    shard_files = sorted(p.name for p in tmp_path.glob("*.safetensors"))

    assert shard_files == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    assert set(index["weight_map"].values()) == set(shard_files)
    for filename in shard_files:
        assert {n for n, f in index["weight_map"].items() if f == filename} == set(load_file(tmp_path / filename))
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in written.values())

    loaded_config, loaded = load_hf_checkpoint(tmp_path)
    assert loaded_config == {**config, "torch_dtype": "bfloat16"}
    assert set(loaded) == set(written) == set(index["weight_map"])
    for name, tensor in written.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    input_ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(reference_logits(loaded_config, loaded, input_ids)["logits"],
                               reference_logits(config, written, input_ids)["logits"], rtol=0, atol=0)


def test_checkpoint_writer_refuses_the_other_model_type(tmp_path):
    with pytest.raises(ValueError, match="model_type"):
        write_ling_checkpoint(tmp_path, tiny_ring_config())
    with pytest.raises(ValueError, match="model_type"):
        write_ring_linear_checkpoint(tmp_path, tiny_ling_config())
