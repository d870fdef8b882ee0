"""A local Ray head (``ray start --head --block``), and worker nodes joined to it
(``ray start --address ... --block``), as supervised local services.

* Ray's token authentication is controlled by ``RAY_AUTH_MODE`` (``token`` | ``disabled``).
  When it is unset, ``ray start`` silently switches to token mode if ``~/.ray/auth_token``
  exists (a local ``ray.init()`` creates it). We always set it explicitly; in ``token`` mode
  the token lives in ``<state>/ray_auth_token`` and is passed with ``RAY_AUTH_TOKEN_PATH``, on
  the server side and on every client (``service.client_env``).
* Ray replaces a node address of ``127.0.0.1`` by the machine's real IP (for multi-node
  clusters) and then binds its GCS, raylet, agents and client server there or on all
  interfaces. With ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (a single-node cluster, which a
  local head is) and ``--node-ip-address 127.0.0.1`` it keeps 127.0.0.1 and every port binds
  to loopback (checked in tests/platform/test_services.py). A head on a real address needs token auth:
  an unauthenticated cluster there is refused.
* ``ray start --address`` (a worker node) aborts when ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, and
  with multi-node support on Ray resolves 127.0.0.1 to the machine's IP: worker nodes join only a
  head on a real address (``node_ip``), several nodes on one machine included (tests/platform/test_two_node.py).
* ``ray start --block`` drains the node for up to 30 s on SIGTERM; we set
  ``RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0`` and signal the leader first so that Ray tears its
  processes down in order. ``ray stop`` is not used: it kills every Ray process of the user by
  name, including other local clusters (e.g. `make run` and the tests side by side).
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Mapping
from pathlib import Path

from .process import (
    LOCALHOST,
    ServiceError,
    ServiceRefused,
    base_env,
    executable,
    free_port,
    http_get,
    is_loopback,
    private_secret,
    require_free,
)
from .service import Service, check_not_running, launch, wait_ready

RAY_DEFAULT_PORT = 6379
RAY_DEFAULT_DASHBOARD_PORT = 8265
RAY_AUTH_MODES = ("token", "disabled")

# Unix domain sockets are limited to 107 bytes; Ray puts
# "<temp_dir>/session_YYYY-MM-DD_HH-MM-SS_ffffff_PID/sockets/plasma_store" under --temp-dir.
_RAY_SOCKET_SUFFIX_LEN = len("/session_2026-01-01_00-00-00_000000_4194304/sockets/plasma_store")
_UNIX_SOCKET_MAX = 107

# a cluster's address and credentials come from this module, never from the caller's environment
_CLIENT_ONLY_ENV = (
    "RAY_AUTH_TOKEN",
    "RAY_AUTH_TOKEN_PATH",
    "RAY_ADDRESS",
    "RAY_API_SERVER_ADDRESS",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER",
)


def ray_token_path(state_dir: str | os.PathLike) -> Path:
    return Path(state_dir).resolve() / "ray_auth_token"


def ensure_ray_token(state_dir: str | os.PathLike) -> Path:
    """Create ``<state>/ray_auth_token`` (0600, 256 random bits) unless it exists."""
    path = ray_token_path(state_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    private_secret(path, secrets.token_hex)
    return path


def ray_auth_headers(service: Service) -> dict[str, str]:
    """HTTP headers for the dashboard / Jobs REST API of a token-auth cluster."""
    token_path = service.client_env.get("RAY_AUTH_TOKEN_PATH")
    if service.client_env.get("RAY_AUTH_MODE") != "token" or not token_path:
        return {}
    return {"Authorization": f"Bearer {Path(token_path).read_text().strip()}"}


def _refuse_unsafe(auth_mode: str, node_ip: str) -> None:
    if auth_mode not in RAY_AUTH_MODES:
        raise ServiceError(f"auth_mode must be one of {RAY_AUTH_MODES}, not {auth_mode!r}")
    if auth_mode == "disabled" and not is_loopback(node_ip):
        raise ServiceRefused(
            f"refusing to start a Ray cluster without authentication (RAY_AUTH_MODE=disabled) on {node_ip}: "
            "anyone who can reach it could run code on it; use --auth-mode token, or --node-ip-address 127.0.0.1"
        )


def _temp_dir(state: Path) -> Path:
    temp_dir = state / "ray-tmp"
    if len(str(temp_dir)) + _RAY_SOCKET_SUFFIX_LEN > _UNIX_SOCKET_MAX:
        raise ServiceError(
            f"state dir {state} is too long for Ray's Unix sockets "
            f"(<= {_UNIX_SOCKET_MAX - _RAY_SOCKET_SUFFIX_LEN - len('/ray-tmp')} characters); "
            "use a shorter --state-dir"
        )
    return temp_dir


def _envs(env: Mapping[str, str] | None, state: Path, auth_mode: str, node_ip: str, url: str) -> tuple[dict, dict]:
    """(the head's environment, a client's environment without the dashboard address).

    The head's own environment has the dashboard address (``RAY_API_SERVER_ADDRESS``): actors
    that call Ray's state API without an address (Ray Train's PlacementGroupCleaner) inherit it.
    Without it they look for a GCS process on the machine and fail when another cluster runs
    there, and a Train run's placement group outlives its trial."""
    client_env = {"RAY_AUTH_MODE": auth_mode, "RAY_USAGE_STATS_ENABLED": "0"}
    if is_loopback(node_ip):
        # single-node: Ray keeps 127.0.0.1 as the node address instead of the machine's IP,
        # so GCS, raylet, agents and the client server all bind to loopback
        client_env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    full_env = base_env(env)
    for key in _CLIENT_ONLY_ENV:
        full_env.pop(key, None)
    if auth_mode == "token":
        client_env["RAY_AUTH_TOKEN_PATH"] = str(ensure_ray_token(state))
    full_env.update(client_env)
    full_env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
    full_env["RAY_API_SERVER_ADDRESS"] = url
    return full_env, client_env


def _node_options(num_cpus: int, temp_dir: Path, **optional) -> list[str]:
    """The options every node takes; ``optional``: num_gpus, object_store_memory, resources."""
    # the agent's port defaults to a fixed one (52365): pick a free one so that two local
    # clusters (e.g. `make run` and the tests), or two nodes of one, can coexist
    cmd = ["--dashboard-agent-listen-port", str(free_port(LOCALHOST))]
    cmd += ["--num-cpus", str(num_cpus), "--temp-dir", str(temp_dir), "--disable-usage-stats"]
    if optional.get("num_gpus") is not None:
        cmd += ["--num-gpus", str(int(optional["num_gpus"]))]
    if optional.get("object_store_memory"):
        cmd += ["--object-store-memory", str(int(optional["object_store_memory"]))]
    if optional.get("resources"):
        cmd += ["--resources", json.dumps({str(k): float(v) for k, v in optional["resources"].items()})]
    return cmd


def _command(*, port: int, dashboard_port: int, node_ip: str, num_cpus: int, temp_dir: Path, **optional) -> list[str]:
    """``ray start --head --block`` with its ports; ``optional``: see :func:`_node_options`."""
    cmd = [executable("ray"), "start", "--head", "--block", "--port", str(port), "--node-ip-address", node_ip]
    cmd += ["--dashboard-host", LOCALHOST, "--dashboard-port", str(dashboard_port)]
    # defaults to a fixed port (10001): a free one, as the agent's
    cmd += ["--ray-client-server-port", str(free_port(LOCALHOST))]
    return cmd + _node_options(num_cpus, temp_dir, **optional)


def _node_state(state_dir: str | os.PathLike, name: str, num_cpus: int | None) -> tuple[Path, Path, int]:
    """A node's state folder (made; refused while a node of this name runs there), its Ray temp dir
    and its CPU count (all of this machine's when not given)."""
    state = Path(state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    check_not_running(state, name)
    return state, _temp_dir(state), int(num_cpus) if num_cpus else (os.cpu_count() or 1)


def start_ray_head(
    state_dir: str | os.PathLike,
    num_cpus: int | None = None,
    *,
    port: int | None = None,
    dashboard_port: int | None = None,
    num_gpus: int | None = None,
    auth_mode: str = "token",
    object_store_memory: int | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 180.0,
    name: str = "ray",
    node_ip: str = LOCALHOST,
    resources: Mapping[str, float] | None = None,
) -> Service:
    """Start a local Ray head (``ray start --head --block``) as a process group.

    ``node_ip`` is the node's address (``--node-ip-address``). At the default 127.0.0.1 the
    cluster is single-node and every Ray port (GCS, raylet, agents, client server) binds to
    loopback; another address makes the GCS reachable from the network for worker nodes,
    which is refused with ``auth_mode="disabled"`` (an open cluster runs anyone's code).
    The dashboard and Jobs API bind to 127.0.0.1 either way (``dashboard_port``, free port
    when None; pass 8265 for the documented address); the GCS listens on ``port`` (free when
    None). ``--temp-dir`` is ``<state>/ray-tmp`` (keep the state dir path short: Unix sockets
    under it are limited to 107 bytes). Usage stats are off. ``auth_mode`` is ``token``
    (default: a per-state-dir token in ``<state>/ray_auth_token``) or ``disabled``; either way
    ``RAY_AUTH_MODE`` is set explicitly on the cluster and in ``service.client_env``.
    ``resources``: custom resources of this node (``--resources``), e.g. ``{"head_node": 1}``.
    Waits for the "Ray runtime started" line and the dashboard's ``/api/version``.
    """
    _refuse_unsafe(auth_mode, node_ip)
    state, temp_dir, num_cpus = _node_state(state_dir, name, num_cpus)
    port = int(port) if port else free_port(LOCALHOST)
    dashboard_port = int(dashboard_port) if dashboard_port else free_port(LOCALHOST)
    require_free(port, LOCALHOST, "ray head (GCS)")
    require_free(dashboard_port, LOCALHOST, "ray dashboard")
    url = f"http://{LOCALHOST}:{dashboard_port}"
    full_env, client_env = _envs(env, state, auth_mode, node_ip, url)
    cmd = _command(
        port=port,
        dashboard_port=dashboard_port,
        node_ip=node_ip,
        num_cpus=num_cpus,
        temp_dir=temp_dir,
        num_gpus=num_gpus,
        object_store_memory=object_store_memory,
        resources=resources,
    )
    service = launch(
        name,
        cmd,
        full_env,
        log_path=state / f"{name}.log",
        cwd=None,
        url=url,
        address="",  # the GCS address, known once the head is up
        port=dashboard_port,
        state_dir=str(state),
        client_env={**client_env, "RAY_API_SERVER_ADDRESS": url},
        extra={"gcs_port": str(port), "temp_dir": str(temp_dir), "num_cpus": str(num_cpus), "node_ip": node_ip},
        leader_first=True,
    )
    headers = ray_auth_headers(service)

    def ready() -> bool:
        if "Ray runtime started" not in Path(service.log_path).read_text(errors="replace"):
            return False
        return http_get(f"{url}/api/version", headers)[0] == 200

    wait_ready(service, ready, timeout, f"Ray runtime started and {url}/api/version")
    current = temp_dir / "ray_current_cluster"
    service.address = current.read_text().strip() if current.exists() else f"{LOCALHOST}:{port}"
    service.save()
    return service


def start_ray_worker(
    head: Service,
    state_dir: str | os.PathLike,
    num_cpus: int | None = None,
    *,
    num_gpus: int | None = None,
    resources: Mapping[str, float] | None = None,
    object_store_memory: int | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 180.0,
    name: str = "ray-worker",
    node_ip: str | None = None,
) -> Service:
    """Join a worker node to ``head`` (``ray start --address <gcs> --block``) as a process group.

    The node uses the head's auth mode and token (``head.client_env``) and keeps its own
    ``--temp-dir`` (``<state>/ray-tmp``). Ray runs worker nodes only with multi-node clusters
    enabled, in which it replaces a loopback address by the machine's IP: the head must
    therefore be on a real address (``start_ray_head(node_ip=...)``, token auth); a head on
    127.0.0.1 is refused here. ``node_ip`` defaults to the head's (two nodes on one machine,
    as in tests). ``resources`` are the node's custom resources (``--resources``), e.g.
    ``{"worker_node": 1}``: tasks that ask for them are placed here. Stop it with ``.stop()``
    (by process group, like the head); the head keeps running.
    """
    head_ip = head.extra.get("node_ip", LOCALHOST)
    if is_loopback(head_ip):
        raise ServiceError(
            f"cannot join a worker node to the head at {head.address}: a head on {head_ip} is single-node "
            "(Ray keeps every port on loopback only without multi-node support); start the head with "
            "node_ip=<this machine's address> (and token auth)"
        )
    node_ip = node_ip or head_ip
    auth_mode = head.client_env.get("RAY_AUTH_MODE", "token")
    _refuse_unsafe(auth_mode, node_ip)
    state, temp_dir, num_cpus = _node_state(state_dir, name, num_cpus)
    full_env = base_env(env)
    for key in _CLIENT_ONLY_ENV:
        full_env.pop(key, None)
    client_env = {k: v for k, v in head.client_env.items() if k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    full_env.update({**client_env, "RAY_USAGE_STATS_ENABLED": "0", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"})
    full_env["RAY_API_SERVER_ADDRESS"] = head.url  # as on the head (see _envs): the head runs on this machine
    cmd = [executable("ray"), "start", "--address", head.address, "--block", "--node-ip-address", node_ip]
    cmd += _node_options(
        num_cpus, temp_dir, num_gpus=num_gpus, object_store_memory=object_store_memory, resources=resources
    )
    service = launch(
        name,
        cmd,
        full_env,
        log_path=state / f"{name}.log",
        cwd=None,
        url=head.url,
        address=head.address,
        port=0,
        state_dir=str(state),
        client_env=dict(head.client_env),
        extra={"temp_dir": str(temp_dir), "num_cpus": str(num_cpus), "node_ip": node_ip, "head": head.address},
        leader_first=True,
    )

    def ready() -> bool:
        return "Ray runtime started" in Path(service.log_path).read_text(errors="replace")

    wait_ready(service, ready, timeout, f"Ray runtime started (joined {head.address})")
    return service
