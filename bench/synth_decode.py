"""Synthetic vs real PNGs: decode time per 512x512 image (interleaved, median ratio), file size,
and what one synthetic image costs to render and encode.

The real image is the one competition PNG in ../shared/data/real/test (or --real FILE).

    PYTHONPATH=. python -m bench.synth_decode
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import REPO, format_table, machine_info, publish

REAL_PNG = REPO.parent / "shared" / "data" / "real" / "test" / "10034.png"


def decode_seconds(png: bytes) -> float:
    from PIL import Image

    started = time.perf_counter()
    with Image.open(io.BytesIO(png)) as image:
        np.asarray(image.convert("RGB"))
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.synth_decode", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", type=Path, default=REAL_PNG)
    parser.add_argument("--images", type=int, default=12, help="synthetic images compared")
    parser.add_argument("--rounds", type=int, default=5, help="decodes of each pair")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    from protein.synth import encode_png, render_image, sample_label_sets

    real = args.real.read_bytes()
    sets = sample_label_sets(args.images, np.random.default_rng(0))
    render_s, encode_s, pngs = [], [], []
    for i, label_set in enumerate(sets):
        started = time.perf_counter()
        rgb = render_image(label_set, 512, np.random.default_rng(i))
        render_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        pngs.append(encode_png(rgb))
        encode_s.append(time.perf_counter() - started)
    # Interleaved pairs: load on a shared machine drifts, a ratio of neighbours does not.
    ratios, real_s, synth_s = [], [], []
    for _ in range(args.rounds):
        for png in pngs:
            r, s = decode_seconds(real), decode_seconds(png)
            real_s.append(r)
            synth_s.append(s)
            ratios.append(s / r)
    result = {
        "benchmark": "synth_decode", "machine": machine_info(), "real_file": str(args.real),
        "real_bytes": len(real), "synth_bytes_median": int(statistics.median(len(p) for p in pngs)),
        "real_decode_ms_median": 1e3 * statistics.median(real_s),
        "synth_decode_ms_median": 1e3 * statistics.median(synth_s),
        "decode_ratio_synth_over_real_median": statistics.median(ratios),
        "render_ms_median": 1e3 * statistics.median(render_s), "encode_ms_median": 1e3 * statistics.median(encode_s),
        "images": args.images, "rounds": args.rounds,
    }
    rows = [{"what": k, "value": v} for k, v in result.items() if isinstance(v, int | float)]
    publish("synth_decode", result, format_table(rows, ["what", "value"]), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
