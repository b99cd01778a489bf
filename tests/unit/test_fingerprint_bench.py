"""The fingerprint benchmark's smoke run: the same code at toy size, so the script cannot rot."""

import json

from bench.fingerprint_bench import main


def test_fingerprint_bench_quick_writes_every_method(tmp_path):
    out = tmp_path / "fingerprint.json"
    assert main(["--quick", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    methods = [row["method"] for row in result["rows"]]
    assert methods == ["stat-only (old, host-local)", "content, cold (no hash cache)", "content, hash cache warm",
                       "zip, first open"]
    assert result["n_files"] == 20 and result["real_images"] == 19_236 + 8_243
