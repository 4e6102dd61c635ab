"""Convert between HF Bailing checkpoints (Ling-2.0, Ring-linear-2.0) and training checkpoints.

    # Ling-2.0 -> hybrid Ring-linear (the recipes' init_from)
    python tools/convert_ling_ckpt.py import --hf /ckpt/Ling-mini-base-2.0-20T \\
        --out /ckpt/ring-mini-init --layer-group-size 5 --group-norm-size 4
    # Ling-2.0 as it is (all softmax), checked against a TP=4 layout
    python tools/convert_ling_ckpt.py import --hf /ckpt/Ling-mini-base-2.0 --out /ckpt/ling \\
        --target softmax --tensor-parallel 4
    # any training checkpoint -> HF (Ring-linear, or Ling-2.0 if all softmax), bf16
    python tools/convert_ling_ckpt.py export --checkpoint runs/x/checkpoints/wsm/s1/merged \\
        --out /ckpt/ring-mini-hf --model-config runs/x/config.yaml --tokenizer-from /ckpt/Ling-mini-base-2.0-20T

`import` reads config.json and the safetensors shards (bf16, fp16, fp32, or FP8 with
block scales), checks every tensor against config.json, and writes a weights-only checkpoint
of layout-free tensors that megatron-core loads at any TP/PP/EP layout. A Ring-linear source
is imported as it is. `export` writes sharded safetensors with an index and copies the
tokenizer files. Both stream one tensor at a time and write nothing unless they complete.
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from ring_train.checkpoint.errors import CheckpointError
from ring_train.checkpoint.hf_export import DEFAULT_SHARD_BYTES, export_hf_checkpoint
from ring_train.checkpoint.hf_import import TARGETS, ImportOptions, import_hf_checkpoint
from ring_train.checkpoint.ling_to_ring import GATE_INITS, GateInit
from ring_train.checkpoint.model_record import load_model_description
from ring_train.config.model import DECAY_VARIANTS
from ring_train.config.parallel import ParallelConfig

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    imp = commands.add_parser("import", help="HF directory -> training checkpoint")
    imp.add_argument("--hf", required=True, help="HF directory: config.json + safetensors shards")
    imp.add_argument("--out", required=True, help="checkpoint directory to create")
    imp.add_argument("--target", choices=TARGETS, default="hybrid",
                     help="hybrid: convert to Ring-linear; softmax: keep the Ling-2.0 model")
    imp.add_argument("--layer-group-size", type=int, help="M lightning + 1 softmax layer per group")
    imp.add_argument("--group-norm-size", type=int, help="groups of the lightning output norm")
    imp.add_argument("--decay-variant", choices=DECAY_VARIANTS, default="A",
                     help="per-layer decay factor of the lightning slopes (ARCH_SPEC §2.4)")
    imp.add_argument("--gate-init", choices=GATE_INITS, default="zero",
                     help="initialisation of the new output gates g_proj")
    imp.add_argument("--gate-std", type=float, default=0.02, help="std of --gate-init normal")
    imp.add_argument("--gate-seed", type=int, default=0, help="seed of --gate-init normal")
    imp.add_argument("--drop-mtp", action="store_true", help="leave the MTP layers out")
    imp.add_argument("--dtype", choices=DTYPES, help="default: fp32 for fp32 sources, else bf16")
    imp.add_argument("--tensor-parallel", type=int, default=1, help="layout to check the model for")
    imp.add_argument("--pipeline-parallel", type=int, default=1)
    imp.add_argument("--expert-parallel", type=int, default=1)

    exp = commands.add_parser("export", help="training checkpoint -> HF directory")
    exp.add_argument("--checkpoint", required=True, help="checkpoint directory or save directory")
    exp.add_argument("--out", required=True, help="HF directory to create")
    exp.add_argument("--model-config",
                     help="recipe model name, model YAML, run config.yaml or HF config.json "
                          "(default: the model an imported checkpoint records)")
    exp.add_argument("--dtype", choices=DTYPES, default="bf16")
    exp.add_argument("--tokenizer-from", help="directory whose tokenizer files are copied "
                                              "(default: the HF directory imported from)")
    exp.add_argument("--max-shard-gib", type=float, default=DEFAULT_SHARD_BYTES / 2**30)

    for command in (imp, exp):
        command.add_argument("--overwrite", action="store_true", help="replace an existing output")
        command.add_argument("--no-checksums", action="store_true",
                             help="skip SHA-256 of the checkpoint files")
        command.add_argument("--quiet", action="store_true", help="no progress counter")
    return parser.parse_args(argv)


def run_import(args: argparse.Namespace) -> str:
    options = ImportOptions(
        target=args.target,
        layer_group_size=args.layer_group_size,
        group_norm_size=args.group_norm_size,
        decay_variant=args.decay_variant,
        gate=GateInit(args.gate_init, args.gate_std, args.gate_seed),
        keep_mtp=not args.drop_mtp,
        dtype=DTYPES[args.dtype] if args.dtype else None,
    )
    parallel = ParallelConfig(
        tensor_parallel=args.tensor_parallel,
        pipeline_parallel=args.pipeline_parallel,
        expert_parallel=args.expert_parallel,
    )
    output = import_hf_checkpoint(
        args.hf, args.out, options, parallel, overwrite=args.overwrite,
        checksums=not args.no_checksums, progress=not args.quiet,
    )
    return f"imported {args.hf} into {output}"


def run_export(args: argparse.Namespace) -> str:
    model = load_model_description(args.model_config) if args.model_config else None
    copied = export_hf_checkpoint(
        args.checkpoint, args.out, model, DTYPES[args.dtype], args.tokenizer_from,
        overwrite=args.overwrite, max_shard_bytes=int(args.max_shard_gib * 2**30),
        checksums=not args.no_checksums, progress=not args.quiet,
    )
    return f"exported {args.checkpoint} to {args.out} (side files: {', '.join(copied) or 'none'})"


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        message = run_import(args) if args.command == "import" else run_export(args)
    except (ValueError, CheckpointError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
