"""Tokenize text into a megatron-core indexed dataset (<prefix>.bin / <prefix>.idx) for
`data.blend`.

    python tools/preprocess_data.py --input a.jsonl b.jsonl --output-prefix data/web
    python tools/preprocess_data.py --input notes.txt --lines-as-documents \\
        --tokenizer path/to/tokenizer.json --output-prefix data/notes

`.jsonl` inputs give one document per line (the --json-key string); other files are plain
text, one document per file (or per line with --lines-as-documents). An EOD token follows
every document; the dataset appears only once complete.
"""

from __future__ import annotations

import argparse
import sys

from ring_train.config.errors import ConfigError
from ring_train.data.preprocess import read_documents, write_dataset
from ring_train.data.tokenizers import load_tokenizer


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", required=True, help="jsonl or text files")
    parser.add_argument("--output-prefix", required=True, help="writes <prefix>.bin/.idx")
    parser.add_argument("--tokenizer", default="byte", help="'byte' or a HF tokenizer.json")
    parser.add_argument(
        "--eod-token",
        default=None,
        help="end-of-document token of a HF tokenizer (default: eos_token of the "
        "tokenizer_config.json beside tokenizer.json)",
    )
    parser.add_argument("--json-key", default="text", help="text field of jsonl records")
    parser.add_argument(
        "--lines-as-documents", action="store_true", help="each line of a text file is a document"
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        tokenizer = load_tokenizer(args.tokenizer, args.eod_token)
        documents = read_documents(args.input, args.json_key, args.lines_as_documents)
        stats = write_dataset(args.output_prefix, documents, tokenizer)
    except (ConfigError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(
        f"{args.output_prefix}: {stats.documents} documents, {stats.tokens} tokens "
        f"(EOD included), {stats.skipped_empty} empty documents skipped; "
        f"vocab {tokenizer.vocab_size}, EOD id {tokenizer.eod}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
