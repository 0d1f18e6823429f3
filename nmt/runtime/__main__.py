"""`python -m nmt.runtime --model DIR2`: translate stdin (or --input) with an exported model,
one sentence per line, without PyTorch installed."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from nmt.runtime.translator import OnnxTranslator


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nmt.runtime", description=__doc__)
    p.add_argument("--model", type=Path, required=True, help="exported directory (nmt export)")
    p.add_argument("--input", type=Path, default=None, help="input file (default: stdin)")
    p.add_argument("--beam-size", type=int, default=None, help="1 is greedy search")
    p.add_argument("--batch-tokens", type=int, default=None, help="source tokens per batch")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: its default)")
    args = p.parse_args(argv)
    try:
        translator = OnnxTranslator.load(args.model, threads=args.threads)
        options = translator.options
        if args.beam_size is not None:
            options = replace(options, beam_size=args.beam_size, n_best=1)
        text = args.input.read_text(encoding="utf-8") if args.input else sys.stdin.read()
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        for result in translator.translate_corpus(lines, options, batch_tokens=args.batch_tokens):
            print(result.text)
    except (ValueError, OSError) as err:
        print(f"python -m nmt.runtime: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
