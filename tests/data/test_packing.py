"""Packing: one row per micro-batch, documents separated by cu_seqlens, EOD targets masked."""

import torch

from ring_train.data.packing import collate
from ring_train.data.stream import BatchLayout, build_streams
from ring_train.data.tokenizers import ByteTokenizer
from tests.data.conftest import documents

E = ByteTokenizer.eod


def _sample(tokens):
    tokens = torch.tensor(tokens)
    return {"tokens": tokens, "labels": tokens + 100, "loss_mask": torch.ones(len(tokens))}


def test_packed_row_has_cu_seqlens_at_sample_starts_and_after_every_eod():
    samples = [_sample([1, 2, E, 3]), _sample([4, 5, 6, E]), _sample([E, 7, 8, 9])]
    batch = collate(samples, pack=True, eod=E)
    assert batch.tokens.tolist() == [[1, 2, E, 3, 4, 5, 6, E, E, 7, 8, 9]]
    assert batch.labels.tolist() == [[t + 100 for t in batch.tokens[0].tolist()]]
    assert batch.cu_seqlens.dtype == torch.int32
    assert batch.cu_seqlens.tolist() == [0, 3, 4, 8, 9, 12]
    assert batch.position_ids.tolist() == [list(range(12))]
    assert batch.loss_mask.shape == (1, 12)


def test_unpacked_micro_batch_keeps_rows_and_has_no_cu_seqlens():
    batch = collate([_sample([1, E, 3]), _sample([4, 5, 6])], pack=False, eod=E)
    assert batch.tokens.tolist() == [[1, E, 3], [4, 5, 6]]
    assert batch.position_ids.tolist() == [[0, 1, 2], [0, 1, 2]]
    assert batch.cu_seqlens is None


def test_stream_packs_megatron_samples_and_masks_the_loss_where_the_input_is_eod(
    make_dataset, config_for
):
    prefix = make_dataset("web", documents(40))
    config = config_for((prefix, 1.0), eod_mask_loss=True, validation_fraction=0.1)
    layout = BatchLayout(seq_length=16, global_batch_size=8, micro_batch_size=4)
    stream = build_streams(config, ByteTokenizer(), layout, train_steps=4).train
    eods_inside_samples = 0
    for step in stream:
        for batch in step:
            tokens, labels, mask = batch.tokens[0], batch.labels[0], batch.loss_mask[0]
            assert tokens.shape == (4 * 16,)
            eod_at = torch.nonzero(tokens == E).flatten()
            starts = set(range(0, 65, 16)) | set((eod_at + 1).tolist())
            assert batch.cu_seqlens.tolist() == sorted(starts)
            # The position after an EOD predicts another document's first token.
            assert torch.equal(mask == 0, tokens == E)
            # Within a sample, the label of a position is the next input token.
            rows, row_labels = tokens.view(4, 16), labels.view(4, 16)
            assert torch.equal(row_labels[:, :-1], rows[:, 1:])
            eods_inside_samples += int(((eod_at % 16) != 15).sum())
    assert eods_inside_samples > 0  # documents really were split inside samples
