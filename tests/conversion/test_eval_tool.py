"""tools/eval.py: logits dumped for given ids and the loss on a dataset are the reference
model's, so conversions and merges can be compared numerically."""

import json

import torch
import torch.nn.functional as F

from ring_train.data.preprocess import write_token_documents
from tests.conversion.tools import evaluate
from tests.reference.hf_models import reference_logits

BYTE_EOD = 256
SEQ = 16


def _run(capsys, *args) -> dict:
    assert evaluate.main(list(map(str, args))) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_dumped_logits_are_the_reference_logits(ling_fp32, softmax_checkpoint, tmp_path, capsys):
    out = tmp_path / "logits.pt"
    result = _run(capsys, "--checkpoint", softmax_checkpoint, "--dump-logits", "1,2,3,4,5", "9,8,7,6,5",
                  "--logits-out", out)
    dumped = torch.load(out)
    assert result["logits"] == str(out)
    assert torch.equal(dumped["token_ids"], torch.tensor([[1, 2, 3, 4, 5], [9, 8, 7, 6, 5]]))
    reference = reference_logits(ling_fp32.config, ling_fp32.state, dumped["token_ids"])["logits"]
    assert ((dumped["logits"] - reference).norm() / reference.norm()).item() < 1e-5


def test_loss_is_the_reference_cross_entropy(ling_fp32, softmax_checkpoint, tmp_path, capsys):
    # Every document is the same SEQ tokens (EOD last), so every sample of any split and
    # shuffle is that document followed by the first token of the next one.
    document = torch.randint(0, BYTE_EOD, (SEQ - 1,), generator=torch.Generator().manual_seed(3))
    document = document.tolist() + [BYTE_EOD]
    prefix = tmp_path / "data" / "same"
    write_token_documents(str(prefix), [document] * 40, vocab_size=BYTE_EOD + 1)
    result = _run(capsys, "--checkpoint", softmax_checkpoint, "--data", prefix, "--seq-length", SEQ,
                  "--samples", 2, "--validation-fraction", 0.1, "--cache-dir", tmp_path / "cache")
    tokens = torch.tensor(document + document[:1])
    logits = reference_logits(ling_fp32.config, ling_fp32.state, tokens[None, :-1])["logits"][0]
    expected = F.cross_entropy(logits, tokens[1:]).item()
    assert result["tokens"] == 2 * SEQ
    assert abs(result["loss"] - expected) < 1e-5 * expected
    assert abs(result["perplexity"] - torch.tensor(expected).exp().item()) < 1e-4 * result["perplexity"]
