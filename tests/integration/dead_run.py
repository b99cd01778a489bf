"""A flow run whose machine died, made in the background from the moment the shared Prefect stack is up.

The zombie automation crashes a run whose heartbeats stopped for TEST_ZOMBIE_AFTER_S (three of
Prefect's 30 s heartbeats). A test that made its dead run itself waited out that window, ~60 s of a
core idle in `make test`; made by the stack's fixture as soon as the stack is up (when a selected test
asserts on it, `dead_run`), the window passes while the other tests of the stack's modules run, and
the test that asserts on it (marked last_in_unit) finds it crashed. In any order it is right, only
slower: the test waits until the run is crashed and alerted.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.conftest import ProteinProcess
from tests.helpers import REPO
from tests.integration.prefect_stack import HEARTBEAT_S, Stack

FIXTURE = "dead_run"  # the prefect_stack fixture starts one when a selected test uses this fixture
HEARD_WITHIN_S = 120.0
ZOMBIE_FLOW = """
import time
from prefect import flow, tags

@flow(name="train", flow_run_name="PROBE_RUN_NAME")  # stands in for a training run whose process dies
def train() -> None:
    time.sleep(600)

with tags("protein-pipeline"):  # the project tag its deployments give their runs, which the automations match
    train()
"""


@dataclass
class DeadRun:
    """A flow run SIGKILLed after the server heard its first heartbeat, so no final state is ever
    reported. Named for itself alone: the stack's own training runs are flow "train" too, and its
    event log holds every heartbeat of the session."""

    name: str
    thread: threading.Thread | None = None  # making it; ended when the run is dead or a problem is known
    process: subprocess.Popen[bytes] | None = None
    flow_run_id: str | None = None
    problem: str | None = None


@contextlib.contextmanager
def dead_run_in_background(stack: Stack, folder: Path) -> Iterator[DeadRun]:
    """Start making a dead run on the stack; on exit no probe process outlives it."""
    dead = DeadRun(name=f"zombie-probe-{uuid.uuid4().hex[:8]}")
    script = folder / "zombie.py"
    script.write_text(ZOMBIE_FLOW.replace("PROBE_RUN_NAME", dead.name))
    dead.thread = threading.Thread(target=kill_after_first_heartbeat, args=(stack, script, dead),
                                   name="zombie-probe", daemon=True)
    dead.thread.start()
    try:
        yield dead
    finally:
        dead.thread.join(timeout=HEARD_WITHIN_S + 60)
        if dead.thread.is_alive() and dead.process is not None:  # hung in a request: end its probe here
            ProteinProcess.kill_group(dead.process)


def kill_after_first_heartbeat(stack: Stack, script: Path, dead: DeadRun) -> None:
    try:
        started = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=5)
        env = {**stack.env, "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S)}
        dead.process = subprocess.Popen([sys.executable, str(script)], env=env, cwd=REPO, start_new_session=True,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + HEARD_WITHIN_S
        beat: list[dict[str, Any]] = []
        while not beat and time.monotonic() < deadline:
            if dead.process.poll() is not None:
                dead.problem = f"the probe flow exited early with {dead.process.returncode}"
                return
            beat = [e for e in stack.events("prefect.flow-run.heartbeat", since=started)
                    if e["resource"].get("prefect.resource.name") == dead.name and flow_name(e) == "train"]
            time.sleep(1)
        if not beat:
            dead.problem = f"no heartbeat from the probe flow within {HEARD_WITHIN_S:.0f} s"
            return
        ProteinProcess.kill_group(dead.process)  # the machine dies: no final state is ever reported
        dead.flow_run_id = beat[0]["resource"]["prefect.resource.id"].removeprefix("prefect.flow-run.")
        with stack.client() as client:
            state = client.read_flow_run(dead.flow_run_id).state
        if not state.is_running():  # else its crash would prove nothing about the zombie automation
            dead.problem = f"the probe's run was {state.name} when its process was killed, not Running"
    except Exception as exc:  # reported by the test that asserts on the run, not lost in this thread
        dead.problem = f"{type(exc).__name__}: {exc}"
    finally:
        if dead.process is not None:  # no probe outlives this thread, whatever went wrong
            ProteinProcess.kill_group(dead.process)


def flow_name(event: dict[str, Any]) -> str | None:
    for related in event.get("related", []):
        if related.get("prefect.resource.role") == "flow":
            return related.get("prefect.resource.name")
    return None
