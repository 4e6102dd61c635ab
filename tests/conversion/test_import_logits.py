"""Imported checkpoints compute what the HF reference computes (fp32): Ling-2.0 imported as
it is (--target softmax) against the Ling-2.0 reference, the converted hybrid against the
Ring-linear reference on the weights it holds; in one process and at TP=2 on gloo."""

import pytest
import torch

from ring_train.checkpoint.evaluation import load_for_evaluation, logits
from ring_train.checkpoint.layout import resolve_checkpoint
from ring_train.checkpoint.marker import read_marker
from ring_train.checkpoint.model_record import model_config_for
from ring_train.config.parallel import ParallelConfig
from ring_train.parallel.distributed import destroy_distributed, init_distributed
from ring_train.testing.multiprocess import run_ranks
from tests.reference.hf_models import reference_logits

RTOL = 1e-5  # fp32 on both sides; only the order of sums differs


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 23), generator=torch.Generator().manual_seed(0))


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def checkpoint_logits(checkpoint, ids, tensor_parallel: int = 1) -> torch.Tensor:
    """Logits [b, T, V] of the model the checkpoint records, loaded at TP=`tensor_parallel`
    (parallel state already initialised for it)."""
    cfg = model_config_for(read_marker(resolve_checkpoint(checkpoint)), checkpoint, None)
    model = load_for_evaluation(checkpoint, cfg, ParallelConfig(tensor_parallel=tensor_parallel),
                                torch.float32)
    return logits(model, ids)


def test_softmax_import_matches_ling_reference(ling_fp32, softmax_checkpoint, one_process):
    ids = _ids(ling_fp32.config["vocab_size"])
    got = checkpoint_logits(softmax_checkpoint, ids)
    assert _rel_err(got, reference_logits(ling_fp32.config, ling_fp32.state, ids)["logits"]) < RTOL


def test_hybrid_import_matches_ring_reference(hybrid_checkpoint, hybrid_hf, ling_fp32, one_process):
    ids = _ids(hybrid_hf.config["vocab_size"])
    got = checkpoint_logits(hybrid_checkpoint, ids)
    reference = reference_logits(hybrid_hf.config, hybrid_hf.state, ids)["logits"]
    assert _rel_err(got, reference) < RTOL
    # The conversion changed the function: the check above is not the Ling model's again.
    ling = reference_logits(ling_fp32.config, ling_fp32.state, ids)["logits"]
    assert _rel_err(got, ling) > 1e-2


def _logits_at_tp2(rank, checkpoints, ids):
    init_distributed(tensor_parallel=2)
    try:
        return [checkpoint_logits(c, ids, tensor_parallel=2) for c in checkpoints]
    finally:
        destroy_distributed()


@pytest.mark.slow
def test_imports_match_references_at_tp2(ling_fp32, softmax_checkpoint, hybrid_checkpoint, hybrid_hf):
    ids = _ids(ling_fp32.config["vocab_size"])
    per_rank = run_ranks(_logits_at_tp2, 2, [str(softmax_checkpoint), str(hybrid_checkpoint)], ids,
                         timeout=240)
    references = [
        reference_logits(ling_fp32.config, ling_fp32.state, ids)["logits"],
        reference_logits(hybrid_hf.config, hybrid_hf.state, ids)["logits"],
    ]
    for rank_logits in per_rank:
        for got, reference in zip(rank_logits, references):
            assert _rel_err(got, reference) < RTOL
