"""What the content-based data fingerprint costs, extrapolated to the real competition set.

A folder of N real-sized PNGs (copies of the real reference image, 522 kB, each with its last bytes
made unique so no two files are equal) is fingerprinted four ways, side by side in one run:

- `stat-only`: the old host-local fingerprint (size + mtime of every file): the baseline, no reads;
- `content, cold`: the new fingerprint with an empty hash cache: every byte read and MD5-hashed;
- `content, hash cache warm`: the new fingerprint again: one stat per file, no reads;
- `zip, first open`: the same files in a zip (stored): every member read and hashed.

The OS page cache is warm for all (the files were just written): `content, cold` is CPU-bound here;
on a cold disk add the time to read the bytes once (real set about 14 GB; e.g. ~30 s at 500 MB/s).
Medians; per-file times are extrapolated to the real set's 19,236 + 8,243 = 27,479 images.

    python -m bench.fingerprint_bench [--quick] [--n-files 300] [--repeats 3]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from bench.common import format_table, machine_info, median, publish, time_repeats
from protein.data import fingerprint, open_dataset

NAME = "fingerprint"
REAL_IMAGES = 19_236 + 8_243
REAL_REFERENCE_PNG = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "test" / "10034.png"


def make_folder(root: Path, n_files: int) -> Path:
    png = REAL_REFERENCE_PNG.read_bytes()
    train = root / "train"
    train.mkdir(parents=True)
    n_train = max(1, n_files * 19_236 // REAL_IMAGES)
    ids = [str(i) for i in range(n_files)]
    (root / "train.csv").write_text("Image,Label\n" + "".join(f"{i},4\n" for i in ids[:n_train]))
    (root / "sample_submission.csv").write_text("Image,Label\n" + "".join(f"{i},0\n" for i in ids[n_train:]))
    (root / "test").mkdir()
    for index, image_id in enumerate(ids):
        folder = train if index < n_train else root / "test"
        # Unique bytes per file; the real size is what costs.
        (folder / f"{image_id}.png").write_bytes(png[:-16] + index.to_bytes(16, "big"))
    return root


def old_stat_fingerprint(root: Path) -> str:
    digest = hashlib.sha256()
    for folder in ("train", "test"):
        for entry in sorted(os.scandir(root / folder), key=lambda e: e.name):
            st = entry.stat()
            digest.update(f"{folder}/{entry.name}\0{st.st_size}:{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def run(n_files: int, repeats: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fingerprint-bench-") as tmp:
        root = make_folder(Path(tmp) / "ds", n_files)
        megabytes = sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) / 1e6
        zip_path = Path(tmp) / "ds.zip"
        with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_STORED) as zf:  # PNGs do not deflate further
            for path in sorted(root.rglob("*")):
                if path.is_file():
                    zf.write(path, path.relative_to(root).as_posix())
        caches = Path(tmp) / "caches"
        counter = iter(range(10**6))

        def content_cold() -> str:
            return fingerprint(open_dataset(root, cache_dir=caches / f"cold-{next(counter)}"))

        def content_warm() -> str:
            return fingerprint(open_dataset(root, cache_dir=caches / "warm"))

        def zip_first() -> str:
            return fingerprint(open_dataset(zip_path, cache_dir=caches / f"zip-{next(counter)}"))

        content_warm()  # fills the warm cache
        assert content_cold() == content_warm() == zip_first()
        timings = {
            "stat-only (old, host-local)": median(time_repeats(lambda: old_stat_fingerprint(root), repeats, 1)),
            "content, cold (no hash cache)": median(time_repeats(content_cold, repeats)),
            "content, hash cache warm": median(time_repeats(content_warm, repeats)),
            "zip, first open": median(time_repeats(zip_first, repeats)),
        }
        shutil.rmtree(caches, ignore_errors=True)
    baseline = timings["stat-only (old, host-local)"]
    rows = [{"method": name, "seconds": round(s, 4), "ms_per_file": round(1e3 * s / n_files, 4),
             "MB_per_s": round(megabytes / s, 1), "x_baseline": round(s / baseline, 1),
             "real_set_s": round(s / n_files * REAL_IMAGES, 1)} for name, s in timings.items()]
    return {"n_files": n_files, "megabytes": round(megabytes, 1), "real_images": REAL_IMAGES,
            "page_cache": "warm", "rows": rows, "machine": machine_info()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fingerprint_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-files", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="20 files, 1 repeat (smoke run)")
    parser.add_argument("--out", type=Path, help="result JSON (default bench/results/fingerprint.json)")
    args = parser.parse_args(argv)
    n_files, repeats = (20, 1) if args.quick else (args.n_files, args.repeats)
    result = run(n_files, repeats)
    table = format_table(result["rows"], ["method", "seconds", "ms_per_file", "MB_per_s", "x_baseline", "real_set_s"])
    publish(NAME, result, f"{n_files} files, {result['megabytes']} MB (page cache warm)\n{table}", args.out,
            args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
