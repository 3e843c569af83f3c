"""Connect to a Ray cluster for one job, fail fast when it cannot be reached, and leave a running one running.

Both Ray jobs (`engine_ray.build_blocklist_on_ray`, `mine.mine_duplicates(engine="ray")`) open their cluster
here. Ray's own connect retries for a minute or more against an address where nothing listens, so the address's
port is probed first with a short socket timeout: an unreachable cluster fails in seconds, naming the address.
Ray is imported only inside these functions: `import guardrail` and the local engine never need it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .errors import ClusterError, UsageError

CONNECT_TIMEOUT_S = 5.0
"""How long the probe of `--address` waits for its port to accept a connection."""
DEFAULT_GCS_PORT = 6379
DEFAULT_CLIENT_PORT = 10001


def import_ray() -> Any:
    try:
        import ray
    except ImportError as error:
        raise UsageError(
            "--engine ray needs Ray Data: pip install 'guardrail[ray]' (or 'ray[data]'); the default --engine local "
            "does not"
        ) from error
    return ray


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Raise `ClusterError` naming `address` when nothing accepts a TCP connection at its host and port.

    `auto` and `local` are Ray's own lookups and are not probed.
    """
    if address in ("auto", "local"):
        return
    host, port = _host_and_port(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as error:
        raise ClusterError(
            f"cannot reach the Ray cluster at --address {address} ({host}:{port}: {error.strerror or error}); "
            "start one there with `ray start --head`, check the address and port, or drop --address to run a "
            "local cluster"
        ) from error


def _host_and_port(address: str) -> tuple[str, int]:
    client = address.startswith("ray://")
    rest = address[len("ray://"):] if client else address
    host, _, port = rest.rpartition(":") if ":" in rest else (rest, "", "")
    if not host:
        raise UsageError(f"--address {address!r} is not HOST:PORT (e.g. 10.0.0.5:6379 or ray://10.0.0.5:10001)")
    try:
        return host.strip("[]"), int(port) if port else (DEFAULT_CLIENT_PORT if client else DEFAULT_GCS_PORT)
    except ValueError as error:
        raise UsageError(f"--address {address!r}: port {port!r} is not a number") from error


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[Any]:
    """Yield the `ray` module connected to a cluster: the one already initialized in this process, the one at
    `address`, or a new local one. A cluster this function started is shut down on exit."""
    ray = import_ray()
    if address is not None:
        check_reachable(address)
    if ray.is_initialized():
        yield ray
        return
    if address is None:  # a local cluster: Ray starts its workers at nice 15 unless told; these are the job itself
        os.environ.setdefault("RAY_worker_niceness", "0")  # (Ray's job manager sets 0 for its jobs too)
    try:
        ray.init(address=address, num_cpus=num_cpus if address is None else None, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, TimeoutError) as error:
        raise ClusterError(f"cannot connect to the Ray cluster at --address {address}: {error}") from error
    try:
        yield ray
    finally:
        ray.shutdown()


def quiet_data_context() -> None:
    """Ray Data without progress bars: the command prints its own summary."""
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
