"""Classify images: `python flows/predict.py IMAGE_OR_DIR --checkpoint PATH [--json]`.

`--checkpoint` takes a .pth written by the training flow, or an exported model.ts / model.onnx
(with its model.json beside it). Prints one line per image (class and probability), or JSON with
`--json`. `--tta flip` averages each image's probabilities with its mirror image's. No Prefect run: classifying a few files should not start a server.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project packages importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harv_train.errors import UserError
from harv_train.reporting.predict import TTA_MODES, format_json, format_table, list_images, load_predictor, predict
from harv_train.core.runtime import configure_threads


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python flows/predict.py",
                                     description="Classify an image, or every image in a folder.")
    parser.add_argument("target", metavar="IMAGE_OR_DIR", help="an image file or a folder of images (recursive)")
    parser.add_argument("--checkpoint", required=True,
                        help="best_model.pth from training, or an exported model.ts / model.onnx")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--tta", choices=TTA_MODES, default="none",
                        help="test-time augmentation: flip averages each image with its mirror image (default: none)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        configure_threads(0)
        paths = list_images(args.target)
        predictor = load_predictor(args.checkpoint)
        results = predict(predictor, paths, tta=args.tta)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    try:
        print(format_json(results, predictor.source) if args.json else format_table(results), flush=True)
    except BrokenPipeError:  # piped into `head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    # Unreadable files are reported in place; the exit code tells scripts that some were.
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
