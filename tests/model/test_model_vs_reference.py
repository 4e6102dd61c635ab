"""The framework's hybrid model computes what the HF Ling-2.0 / Ring-linear-2.0 models compute.

Weights are random HF tensors mapped through `ring_train.checkpoint.hf_layout`; the yardstick is
the plain PyTorch reference in tests/reference (written from the architecture spec alone).
"""

import pytest
import torch

from megatron.core.packed_seq_params import PackedSeqParams
from ring_train.checkpoint.hf_config import model_config_from_hf
from ring_train.checkpoint.hf_layout import hf_to_megatron
from ring_train.config.parallel import ParallelConfig
from ring_train.model.builder import build_model
from ring_train.model.transformer_config import to_transformer_config
from tests.reference.hf_checkpoint import random_hf_state_dict, tiny_ling_config, tiny_ring_config
from tests.reference.hf_models import reference_logits

RTOL = 1e-5  # fp32 everywhere; both sides sum in different orders


def _framework_model(hf_config, hf_state, **model_fields):
    cfg = model_config_from_hf(hf_config, **model_fields)
    config = to_transformer_config(cfg, ParallelConfig(moe_token_dispatcher="allgather"))
    model = build_model(cfg, config)
    missing, unexpected = model.load_state_dict(hf_to_megatron(hf_state, cfg), strict=False)
    assert not unexpected, unexpected
    assert all(k.endswith("_extra_state") for k in missing), missing
    return model.eval()


def _forward(model, ids, packed=None):
    """Main logits [B, T, V] and, when the model has MTP, the MTP logits [B, T, V].

    Read from the output layer's calls: GPTModel returns losses, not logits, once it has MTP
    (and then needs labels), and calls the output layer for each MTP layer before the main one.
    Cloned, because the vocab-parallel cross entropy overwrites the logits in place.
    """
    outputs = []
    hook = model.output_layer.register_forward_hook(lambda m, i, out: outputs.append(out[0].clone()))
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    labels = ids if model.mtp_process else None
    model(ids, positions, None, labels=labels, packed_seq_params=packed)
    hook.remove()
    logits = [o.transpose(0, 1) for o in outputs]
    return logits[-1], (logits[0] if len(logits) > 1 else None)


def _rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("kind", ["ling", "ring", "ring_mtp", "ring_variant_b"])
def test_logits_match_reference(single_process, kind):
    hf_config = {
        "ling": tiny_ling_config(),
        "ring": tiny_ring_config(),
        "ring_mtp": tiny_ring_config(num_nextn_predict_layers=1),
        "ring_variant_b": tiny_ring_config(),
    }[kind]
    variant = "B" if kind == "ring_variant_b" else "A"
    hf_state = random_hf_state_dict(hf_config, dtype=torch.float32, seed=3)
    model = _framework_model(hf_config, hf_state, decay_variant=variant)
    ids = torch.randint(0, hf_config["vocab_size"], (2, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, mtp_logits = _forward(model, ids)
    ref = reference_logits(hf_config, hf_state, ids, decay_variant=variant)
    assert _rel_err(logits, ref["logits"]) < RTOL
    if ref["mtp_logits"] is not None:
        # The last position's MTP input lies beyond the sequence: megatron zero-fills it,
        # the reference wraps around; neither has a label there.
        assert _rel_err(mtp_logits[:, :-1], ref["mtp_logits"][:, :-1]) < RTOL


def test_packed_documents_match_reference(single_process):
    hf_config = tiny_ring_config()
    hf_state = random_hf_state_dict(hf_config, dtype=torch.float32, seed=4)
    model = _framework_model(hf_config, hf_state)
    cu_seqlens = torch.tensor([0, 11, 12, 30, 41], dtype=torch.int32)
    ids = torch.randint(0, hf_config["vocab_size"], (1, 41), generator=torch.Generator().manual_seed(1))
    packed = PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                             max_seqlen_q=41, max_seqlen_kv=41)
    with torch.no_grad():
        logits, _ = _forward(model, ids, packed)
        unpacked, _ = _forward(model, ids)
    ref = reference_logits(hf_config, hf_state, ids, cu_seqlens=cu_seqlens)
    assert _rel_err(logits, ref["logits"]) < RTOL
    # Guard: the document boundaries change the result, so the check above is not vacuous.
    assert _rel_err(unpacked, ref["logits"]) > 1e-3
