"""Merge constant-LR checkpoints into an annealed model (WSM) as a weights-only checkpoint.

    python tools/wsm_merge.py runs/x/checkpoints/wsm/s1/iter_* --shape 1-sqrt --output merged/
    python tools/wsm_merge.py ckpt_a ckpt_b ckpt_c --weights 0.2 0.3 0.5 --output merged/

Inputs are checkpoint directories (weights-only or training; only the model is merged),
taken oldest step first whatever the order given; --weights are in that order. Shapes turn a
learning-rate decay curve into merge weights (ring_train.checkpoint.wsm). The output is
written aside and renamed into place when complete; an existing output is refused.
"""

from __future__ import annotations

import argparse
import sys

from ring_train.checkpoint.errors import CheckpointError
from ring_train.checkpoint.wsm import DECAY_CURVES, merge_checkpoints, merge_weights, oldest_first

SHAPES = ["uniform", *DECAY_CURVES]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+", help="checkpoint directories to merge")
    weights = parser.add_mutually_exclusive_group(required=True)
    weights.add_argument("--shape", choices=SHAPES, help="decay shape to emulate")
    weights.add_argument(
        "--weights", type=float, nargs="+", help="merge weights, oldest checkpoint first, sum 1"
    )
    parser.add_argument("--output", required=True, help="directory of the merged checkpoint")
    parser.add_argument(
        "--no-checksums",
        action="store_true",
        help="check input file sizes only, and record no SHA-256 in the output",
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        sources = oldest_first(args.checkpoints)
        weights = args.weights or merge_weights(args.shape, len(sources))
        output = merge_checkpoints(sources, weights, args.output, checksums=not args.no_checksums)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for source, weight in zip(sources, weights):
        print(f"{weight:.6f}  {source}")
    print(f"merged {len(sources)} checkpoints into {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
