"""A user's first contact: flow modules run from a shell in a brand-new PREFECT_HOME.

The first start of Prefect's API in a new PREFECT_HOME creates and migrates its database; on a
loaded 2-core machine that outlasted the temporary server's 20 s wait and the very first
`make run` died with a traceback. These tests run the modules as a user would (a process, a
fresh PREFECT_HOME, no PREFECT_API_URL) and check both the success and the one-line failures.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
from pathlib import Path

import pytest

from flows.cli import EXIT_PREFECT_UNAVAILABLE, EXIT_TERMINATED, SERVER_LOG_NAME
from tests.conftest import ProteinProcess, holding_a_closed_port
from tests.helpers import REPO, write_dataset

pytestmark = pytest.mark.integration


def fresh_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
                "GX_ANALYTICS_ENABLED": "false", "PYTHONPATH": str(REPO)})
    env.update(extra)
    return env


def processes_with_env(name: str, value: str) -> list[int]:
    """Pids of live processes whose environment has name=value (Linux /proc)."""
    needle = f"{name}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:  # gone, or not ours to read
                continue
    return found


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    labels = {str(i): ("4" if i % 2 else "0 6") for i in range(24)}
    return write_dataset(tmp_path / "data", labels, ["t1", "t2", "t3"], size=32)


def test_retrain_module_completes_in_a_brand_new_prefect_home_then_sigterm_stops_its_server(tmp_path: Path,
        tiny_dataset: Path, protein_process: ProteinProcess) -> None:
    """Then a second run in that home (migrated now: its server is up in seconds, where a brand-new
    home's migration is the test's longest wait) is SIGTERMed mid-run."""
    home = tmp_path / "new-prefect-home"  # does not exist yet: nothing migrated, nothing cached
    store = tmp_path / "store"
    result = protein_process.module("flows.retrain", "--data", str(tiny_dataset), "--store", str(store), "--epochs",
                                    "1", "--image-size", "32", "--expected-image-size", "32", "--min-score", "0",
                                    env=fresh_env(home), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["promoted"] is True and outcome["champion"] == outcome["challenger"]
    assert (store / "registry" / "champion.json").exists()
    # The run went through a server this command started in that home, which created its database there.
    assert (home / "prefect.db").exists()
    assert (home / SERVER_LOG_NAME).exists()
    sigterm_mid_run_stops_the_server(protein_process, home, tiny_dataset, tmp_path / "store-of-the-killed-run")


def test_unreachable_api_is_one_line_with_its_own_exit_code(tmp_path: Path, tiny_dataset: Path,
        protein_process: ProteinProcess) -> None:
    with holding_a_closed_port() as port:  # held by a socket that never listens: nothing can answer there
        url = f"http://127.0.0.1:{port}/api"
        result = protein_process.module("flows.validate", "--data", str(tiny_dataset), "--image-size", "32",
                                        env=fresh_env(tmp_path / "home", PREFECT_API_URL=url), cwd=tmp_path)
    assert result.returncode == EXIT_PREFECT_UNAVAILABLE, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert url in lines[0] and "PREFECT_API_URL" in lines[0] and "prefect server start" in lines[0]


def test_a_server_that_does_not_come_up_in_time_is_one_line_and_is_stopped(tmp_path: Path, tiny_dataset: Path,
        protein_process: ProteinProcess) -> None:
    home = tmp_path / "home"
    # No server is healthy within half a second, so the bounded wait must give up cleanly.
    env = fresh_env(home, PROTEIN_PREFECT_STARTUP_TIMEOUT_S="0.5")
    result = protein_process.module("flows.validate", "--data", str(tiny_dataset), "--image-size", "32", env=env,
                                    cwd=tmp_path)
    assert result.returncode == EXIT_PREFECT_UNAVAILABLE, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "PROTEIN_PREFECT_STARTUP_TIMEOUT_S" in lines[0] and str(home / SERVER_LOG_NAME) in lines[0]
    assert re.search(r"127\.0\.0\.1:\d+/api", lines[0])
    assert processes_with_env("PREFECT_HOME", str(home)) == [], "the half-started server was left running"


def sigterm_mid_run_stops_the_server(protein_process: ProteinProcess, home: Path, tiny_dataset: Path,
                                     store: Path) -> None:
    # `kill PID` (or `timeout`, or a service manager that signals only the main process) mid-run: the
    # process died at once and its server child went on listening and holding PREFECT_HOME's database.
    process = protein_process.popen("--data", str(tiny_dataset), "--store", str(store), "--epochs",
                                    "1", "--image-size", "32", "--expected-image-size", "32", "--min-score", "0",
                                    env=fresh_env(home), module="flows.retrain")
    try:
        assert process.stderr is not None
        seen = []
        for line in process.stderr:  # Prefect logs the flow run's start once its server is up
            seen.append(line)
            if "Beginning flow run" in line:
                break
        servers = [pid for pid in processes_with_env("PREFECT_HOME", str(home)) if pid != process.pid]
        assert len(servers) == 1, "".join(seen)[-3000:]
        command_line = (Path("/proc") / str(servers[0]) / "cmdline").read_bytes().split(b"\0")
        port = int(command_line[command_line.index(b"--port") + 1])
        os.kill(process.pid, signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
        assert not Path(f"/proc/{servers[0]}").exists(), f"the server child outlived the command: {stderr[-3000:]}"
        assert processes_with_env("PREFECT_HOME", str(home)) == []
        with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        assert process.returncode == EXIT_TERMINATED, stderr[-3000:]
        assert stderr.strip().splitlines()[-1] == "python -m flows.retrain: terminated (SIGTERM)"
        assert "Traceback" not in stderr
    finally:
        ProteinProcess.kill_group(process)
