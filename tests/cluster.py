"""A whole Tether deployment in child processes, for load-balancer and chaos tests.

Theory of operation
-------------------
``Cluster`` owns, in one temporary folder:

* N ``sync-server serve`` instances (``Instance``) on one PostgreSQL — the shared one
  with a private schema, or a ``PrivatePostgres`` cluster the test may kill — each on a
  fixed port so that it can be restarted behind the same address;
* HAProxy in front of them, from the shipped ``deploy/haproxy.cfg`` (``tests/lb.py``);
* the job service (``tests/cluster_child.py job-service``) in a child process; its
  books are read over ``GET /stats``, its fault rates set over ``POST /config``;
* K SDK clients (``ClientProc``), each a child process with its own SQLite file, an
  optional ``BackgroundProxy`` fault proxy on its link, a side file of every returned
  mutation (the history) and a status file of its connects and disconnects.

Helpers kill (SIGKILL), drain (SIGTERM) and restart instances and clients, stop and
start PostgreSQL, and wait on conditions with deadlines — never fixed sleeps. The
checker (``tests/cluster_check.py``) then decides from the records alone.

Nothing here stops or restarts the machine's shared PostgreSQL: ``PrivatePostgres``
is an ``initdb`` cluster in a folder owned by the ``postgres`` user (LESSONS).

Layout: this module holds ``Cluster``; ``tests/cluster_procs.py`` the child processes
(``Instance``, ``JobService``, ``ClientProc``) and ``wait_until``;
``tests/cluster_pg.py`` ``PrivatePostgres`` and the store reads. Import from here.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import httpx

from tests.cluster_pg import (
    PG_BIN,
    PrivatePostgres,
    dump_events,
    private_postgres,
    read_store,
    statuses,
    store_snapshot,
    try_statuses,
)
from tests.cluster_procs import (
    ROOT,
    ClientProc,
    ClientSpec,
    Instance,
    JobService,
    wait_until,
)
from tests.faultproxy import BackgroundProxy
from tests.lb import haproxy
from tests.servers import SECRET, free_port

__all__ = [
    "PG_BIN",
    "ROOT",
    "ClientProc",
    "ClientSpec",
    "Cluster",
    "Instance",
    "JobService",
    "PrivatePostgres",
    "dump_events",
    "private_postgres",
    "read_store",
    "statuses",
    "store_snapshot",
    "try_statuses",
    "wait_until",
]

# ------------------------------------------------------------------ the cluster


class Cluster:
    """Instances behind HAProxy, the job service, and SDK client processes.

    Args:
        workdir: a folder for logs, client files and the HAProxy config.
        database_url: the PostgreSQL URL every instance uses (with ``?schema=``).
        instances: how many ``sync-server serve`` processes.
        lease: saga lease seconds (``--lease``).
        proxied_clients: put a ``BackgroundProxy`` on each client's link.
        run: a tag that makes this run's workflow ids unique.
        seed: seeds workflow inputs and client pacing.
    """

    def __init__(
        self,
        workdir: Path,
        database_url: str,
        *,
        instances: int = 2,
        lease: float = 2.0,
        proxied_clients: bool = False,
        run: str = "run",
        seed: int = 1,
        render_timeout: float = 2.5,
        job_stall: float = 4.0,
        reconcile: bool = False,
        server_env: dict[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.database_url = database_url
        self.lease = lease
        self.run = run
        self.seed = seed
        self.proxied_clients = proxied_clients
        self.jobs = JobService(free_port(), workdir / "job-service.log", seed, job_stall)
        env = {
            "SYNC_AUTH_SECRET": SECRET,
            "TETHER_JOB_SERVICE": self.jobs.url,
            "TETHER_RENDER_TIMEOUT": str(render_timeout),
            **(server_env or {}),
        }
        self.instances = [
            Instance(f"s{i}", free_port(), database_url, env, lease, workdir / f"s{i}.log")
            for i in range(instances)
        ]
        if reconcile:  # the sweep asks the job service about every running render
            for instance in self.instances:
                instance.extra_args = [
                    "--sources",
                    "tests.cluster_child:sources",
                    "--job-step",
                    "generate_image=render",
                ]
        self.front_port = free_port()
        self.clients: list[ClientProc] = []
        self._stack = contextlib.ExitStack()

    @property
    def front_url(self) -> str:
        return f"ws://127.0.0.1:{self.front_port}"

    def __enter__(self) -> Cluster:
        try:
            self.jobs.start()
            self._stack.callback(self.jobs.stop)
            self._stack.callback(self._stop_processes)
            for instance in self.instances:
                instance.spawn()
            for instance in self.instances:
                instance.start()
            self._stack.enter_context(
                haproxy(self.front_port, [i.port for i in self.instances], self.workdir)
            )
            wait_until(self._front_ready, 30, "HAProxy routes to a ready instance")
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _front_ready(self) -> bool:
        with contextlib.suppress(httpx.HTTPError):
            url = f"http://127.0.0.1:{self.front_port}/readyz"
            return httpx.get(url, timeout=2).status_code == 200
        return False

    def _stop_processes(self) -> None:
        for client in self.clients:
            client.kill()  # (their proxies are stopped by their own callbacks)
        for instance in self.instances:
            if instance.alive:
                with contextlib.suppress(Exception):
                    instance.terminate(timeout=20)
            instance.kill()

    # -------------------------------------------------------------- clients
    def add_client(self, spec: ClientSpec) -> ClientProc:
        url = self.front_url
        proxy = None
        if self.proxied_clients:
            proxy = BackgroundProxy(("127.0.0.1", self.front_port), seed=spec.index).start()
            self._stack.callback(proxy.stop)
            url = f"ws://127.0.0.1:{proxy.port}"
        client = ClientProc(spec, url, self.workdir, self.run, self.seed, proxy)
        self.clients.append(client)
        client.start()
        return client

    def restart_client(self, client: ClientProc) -> None:
        client.kill()
        client.start()

    # -------------------------------------------------------------- reads
    def server_ids(self) -> dict[str, str]:
        """Every server id seen -> instance name."""
        return {sid: i.name for i in self.instances for sid in i.server_ids}

    def instance_of_pid(self, pid: int) -> Instance | None:
        return next((i for i in self.instances if i.pid == pid), None)

    def all_server_logs(self) -> str:
        return "\n".join(f"== {i.name}\n{i.tail(15)}" for i in self.instances)
