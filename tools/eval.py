"""Loss / perplexity of a checkpoint on a dataset, and its logits for given token ids.

    python tools/eval.py --checkpoint /ckpt/ring-mini-init --data /data/val_text_document \\
        --tokenizer /ckpt/Ling-mini-base-2.0-20T/tokenizer.json --seq-length 4096 --samples 64
    python tools/eval.py --checkpoint /ckpt/ring-mini-init --dump-logits 1,2,3,4 5,6,7,8 \\
        --logits-out logits.pt
    torchrun --nproc-per-node 8 tools/eval.py --checkpoint ... --tensor-parallel 4 ...

The loss is over the validation samples of the blend (`default`: the built-in corpus), the
ones a training run with the same data settings evaluates. `--dump-logits` takes sequences of
equal length (comma-separated ids) and saves {"token_ids": [b, T], "logits": [b, T, V] fp32}.
Results are printed as one JSON line by rank 0.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch
import torch.distributed as dist

from ring_train.checkpoint.errors import CheckpointError
from ring_train.checkpoint.evaluation import load_for_evaluation, logits, validation_loss
from ring_train.checkpoint.layout import resolve_checkpoint
from ring_train.checkpoint.marker import read_marker
from ring_train.checkpoint.model_record import model_config_for
from ring_train.config.data import DataConfig
from ring_train.config.parallel import ParallelConfig
from ring_train.parallel.distributed import destroy_distributed, init_distributed

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory or save directory")
    parser.add_argument("--model-config",
                        help="recipe model name, model YAML, run config.yaml or HF config.json "
                             "(default: the model an imported checkpoint records)")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--data", nargs="+", help="indexed dataset prefixes, or 'default'")
    parser.add_argument("--tokenizer", default="byte", help="'byte' or a HF tokenizer.json")
    parser.add_argument("--seq-length", type=int, default=1024)
    parser.add_argument("--samples", type=int, default=16, help="validation samples to evaluate")
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--validation-fraction", type=float, default=DataConfig.validation_fraction)
    parser.add_argument("--seed", type=int, default=DataConfig.seed, help="data shuffle seed")
    parser.add_argument("--cache-dir", help="dataset index cache (default: the data config's)")
    parser.add_argument("--dump-logits", nargs="+", metavar="IDS",
                        help="token id sequences of equal length, e.g. 1,2,3 4,5,6")
    parser.add_argument("--logits-out", default="logits.pt")
    parser.add_argument("--tensor-parallel", type=int, default=1)
    parser.add_argument("--pipeline-parallel", type=int, default=1)
    parser.add_argument("--expert-parallel", type=int, default=1)
    parser.add_argument("--no-checksums", action="store_true")
    args = parser.parse_args(argv)
    if not args.data and not args.dump_logits:
        parser.error("nothing to do: give --data, --dump-logits or both")
    return args


def token_ids(sequences) -> torch.Tensor:
    rows = [[int(i) for i in sequence.split(",")] for sequence in sequences]
    if len({len(row) for row in rows}) != 1:
        raise ValueError(f"--dump-logits sequences have lengths {[len(r) for r in rows]}; use one length.")
    return torch.tensor(rows)


def evaluate_checkpoint(args: argparse.Namespace) -> dict:
    parallel = ParallelConfig(
        tensor_parallel=args.tensor_parallel, pipeline_parallel=args.pipeline_parallel,
        expert_parallel=args.expert_parallel,
    )
    checkpoint = resolve_checkpoint(args.checkpoint)
    cfg = model_config_for(read_marker(checkpoint), checkpoint, args.model_config)
    model = load_for_evaluation(checkpoint, cfg, parallel, DTYPES[args.dtype], not args.no_checksums)
    result = {"checkpoint": str(checkpoint)}
    if args.data:
        data = DataConfig(
            blend=[{"path": path, "weight": 1.0} for path in args.data],
            tokenizer=args.tokenizer, validation_fraction=args.validation_fraction,
            seed=args.seed, num_workers=0, cache_dir=args.cache_dir,
        )
        loss, tokens = validation_loss(model, data, args.seq_length, args.samples, args.micro_batch_size)
        result.update(loss=loss, perplexity=math.exp(loss), tokens=tokens)
    if args.dump_logits:
        ids = token_ids(args.dump_logits)
        values = logits(model, ids)
        if dist.get_rank() == 0:
            torch.save({"token_ids": ids, "logits": values}, args.logits_out)
        result["logits"] = args.logits_out
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    init_distributed(
        tensor_parallel=args.tensor_parallel, pipeline_parallel=args.pipeline_parallel,
        expert_parallel=args.expert_parallel,
    )
    rank = dist.get_rank()
    try:
        result = evaluate_checkpoint(args)
    except (ValueError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        destroy_distributed()
    if rank == 0:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
