"""A throwaway highly available Prefect server on this machine, from Debian's packages and PyPI:
PostgreSQL, Redis, two `prefect server start --no-services` API processes on one database, one
`prefect server services start` process, and nginx balancing the two APIs. The layout and the
settings are those of Prefect's "scale self-hosted Prefect" guide (see docs/runbook.md,
"Production"); tests and bench/ha_load.py stand it up through this package.

    with running_postgres(root) as pg:
        stack = start_ha_prefect(root / "a", pg, base_env)   # base_env: PREFECT_HOME, telemetry off...
        ...  # clients use stack.client_env(base_env): PREFECT_API_URL is nginx
        stop_ha_prefect(stack)

Every process listens on 127.0.0.1 only, on a port picked free and held by retrying: a port taken
between the pick and the bind makes that process exit, and it is started again on another.

nginx's open-source build has no active health checks (`health_check` is NGINX Plus): the
upstreams are checked passively, a failed connect marks one down for `fail_timeout` and the request
goes to the other (`proxy_next_upstream`); Prefect's client retries what nginx answers 502.

The package holds one concern a module: `daemons` (starting a process on a port held by retrying),
`postgres` (the cluster and the template it copies each stack's database from), `redis_server`,
`balancer` (nginx), `stack` (the APIs and services process, put together) and `cli`.
"""

from deployments.ha_stack.balancer import UPSTREAM_KEEPALIVE, nginx_config
from deployments.ha_stack.daemons import PREFECT, Daemon, StartError
from deployments.ha_stack.postgres import Postgres, register_block_types, running_postgres, template_key
from deployments.ha_stack.redis_server import redis_settings, start_redis
from deployments.ha_stack.stack import HAPrefect, start_ha_prefect, stop_ha_prefect

__all__ = ["PREFECT", "UPSTREAM_KEEPALIVE", "Daemon", "HAPrefect", "Postgres", "StartError", "nginx_config",
           "redis_settings", "register_block_types", "running_postgres", "start_ha_prefect", "start_redis",
           "stop_ha_prefect", "template_key"]
