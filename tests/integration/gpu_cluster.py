"""The multi-host cluster of test_multihost.py and test_dispatch_faults.py: a highly available
Prefect server, a CPU host's worker and GPU hosts made on demand, each "host" in an empty directory
of its own, the code from a git clone of this checkout, the dataset only in S3. One per session
(tests/integration/conftest.py `cluster`): `make test` runs both modules on one worker and stops it
after their last test (tests/tiers.py SHARED_FIXTURE_MODULES)."""

from __future__ import annotations

import contextlib
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from deployments.ha_stack import Postgres
from tests.helpers import write_dataset
from tests.integration.prefect_services import (
    Service,
    aws_env,
    deploy_from_fresh_clone,
    git_remote_of_worktree,
    host_env,
    prefect_env,
    pushing_while_the_server_starts,
    running_services,
    s3_client,
    stop_all,
    worker_args,
)

TEST_IDS = ["900", "901", "902"]
IMAGE = 32
# The dispatcher calls a worker lost after 3 missed heartbeats: 15 s here, 90 s by default.
WORKER_HEARTBEAT_S = "5"


@dataclass
class Cluster:
    root: Path
    env: dict[str, str]  # what every process inherits: the API URL and the S3 endpoint and keys
    api_url: str
    bucket: str
    data_uri: str
    commit: str
    services: list[Service]

    def gpu_host(self, name: str) -> tuple[Service, Path]:
        """A fresh GPU-pool worker in a directory of its own; it allows CPU explicitly. It replaces
        the GPU workers started before it, so the runs that follow can only go to this one."""
        previous = [s for s in self.services if s.name.startswith("worker-gpu") and not s.killed]
        for service in previous:
            service.killed = True  # gone on purpose: wait_final must not report it
        stop_all(previous)
        root = self.root / name
        # Two modules share the cluster: a name used twice would hand one test the other's caches.
        assert not root.exists(), f"a GPU host named {name} already ran in this cluster"
        env = host_env(self.env, root, {"PROTEIN_ALLOW_CPU": "1",
                                        "PREFECT_WORKER_HEARTBEAT_SECONDS": WORKER_HEARTBEAT_S})
        service = Service(f"worker-{name}", worker_args("gpu", name), env, self.root, cwd=root)
        self.services.append(service)
        return service, root.resolve()


@contextlib.contextmanager
def running_cluster(s3_endpoint: str, pg: Postgres, root: Path) -> Iterator[Cluster]:
    """The cluster in root: its own highly available server on pg, a bucket on s3_endpoint, the
    dataset pushed, the deployments deployed from a fresh clone, the CPU host's worker started."""
    from deployments.ha_stack import start_ha_prefect, stop_ha_prefect

    bucket = f"hosts-{uuid.uuid4().hex[:12]}"
    aws = aws_env(s3_endpoint)
    s3_client(s3_endpoint).create_bucket(Bucket=bucket)
    labels = {str(i): ["0", "4", "6 4", "2 5"][i % 4] for i in range(48)}
    local = write_dataset(root / "dataset", labels, TEST_IDS, size=IMAGE)
    hosts_env = prefect_env(root / "server", {**aws, "PROTEIN_STORE": f"s3://{bucket}/deployed"})
    with contextlib.ExitStack() as resources:  # closed in reverse: the hosts' workers, the server, the push
        pushed = resources.enter_context(
            pushing_while_the_server_starts(local, hosts_env["PROTEIN_STORE"], hosts_env))
        ha = start_ha_prefect(root / "ha", pg, prefect_env(root / "server-home"))
        resources.callback(stop_ha_prefect, ha)
        data_uri = pushed()["uri"]  # the channel deploy checks
        assert data_uri.startswith("s3://"), data_uri
        shutil.rmtree(local)
        # The server is the highly available one: every host talks to its nginx.
        env = ha.client_env(hosts_env)

        remote, commit = git_remote_of_worktree(root)
        services = resources.enter_context(running_services())
        # Nothing listens on port 9 on loopback: alerts are lost, as with a webhook that is down.
        deployed = deploy_from_fresh_clone({**env, "PROTEIN_ALERT_WEBHOOK_URL": "http://127.0.0.1:9/hook",
                                            "PROTEIN_GPU_SLOTS": "1"}, remote, root)
        assert deployed.returncode == 0, f"deploy failed:\n{deployed.stdout[-3000:]}\n{deployed.stderr[-3000:]}"
        assert not (root / "deploy-checkout").exists()
        # The CPU host runs several flows at once (a retrain and a second, queued one).
        cpu = root / "cpu-host"
        services.append(Service("worker-cpu", ["worker", "start", "--pool", "cpu", "--name", "cpu-host",
                                               "--no-create-pool-if-not-found"], host_env(env, cpu), root, cwd=cpu))
        yield Cluster(root, env, env["PREFECT_API_URL"], bucket, data_uri, commit, services)
