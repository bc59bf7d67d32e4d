"""Command-line options of a cross-model run, kept free of torch so the CLI's parser can hold them.

Used by ``edgebus bench quality --sender A --receiver B`` and ``python -m nodes.bench.crossmodel``; both hand
the parsed options to :func:`nodes.bench.crossmodel.run_from_args`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

#: First calibration row (benchmarks score rows 0..199; contexts equal to a scored one are skipped too).
DEFAULT_CALIB_OFFSET = 500


def add_pair_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The options of a cross-model run beyond the scored data's own."""
    parser.add_argument("--calib-data", type=Path, default=None, help="calibration texts (default: --data)")
    parser.add_argument("--calib-rows", type=int, default=100)
    parser.add_argument("--calib-offset", type=int, default=DEFAULT_CALIB_OFFSET, help="first row used")
    parser.add_argument("--calibration", type=Path, help="artifact to reuse, or where to save a new fit")
    parser.add_argument("--ridge", type=float, default=0.05)
    parser.add_argument("--span", type=int, default=2)
    parser.add_argument("--variance-match", action="store_true")
    parser.add_argument("--bits", type=int, default=4, help="card width: 1..8, 16 (fp16) or 32 (lossless)")
    parser.add_argument("--translate-at", choices=("receiver", "sender"), default="receiver")
