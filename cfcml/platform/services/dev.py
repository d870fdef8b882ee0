"""`cfcml dev start|stop|status|env` (and ``python -m cfcml.platform.services``): the local
MLflow server, Ray head and S3, started in the background and stopped by recorded process id.

The shell scripts ``mlflow/start.sh``, ``mlflow/stop.sh``, ``cluster/start_local.sh`` and
``cluster/stop_local.sh`` are thin wrappers around these commands, so there is one
implementation of each thing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from ..redact import redact
from .mlflow_server import MLFLOW_DEFAULT_PORT, start_mlflow_server
from .process import LOCALHOST, ServiceError, ServiceRefused, default_state_dir
from .ray_head import RAY_AUTH_MODES, RAY_DEFAULT_DASHBOARD_PORT, RAY_DEFAULT_PORT, start_ray_head
from .s3 import start_moto_s3
from .service import Service, ServiceAlreadyRunning, load_service

SERVICE_NAMES = ("mlflow", "ray", "s3")
DESCRIPTION = "Start, stop and list the local MLflow server, Ray head and S3 (moto), by process id."
DEV_STACK = ("mlflow", "ray")  # what `start` without a service name starts: what `make run` uses
STOP_ORDER = ("ray", "mlflow", "s3")  # the clients (Ray job drivers log to MLflow and S3) first


def _env_lines(service: Service) -> list[str]:
    """``export`` lines for a client shell; a password is read from its 0600 file when the
    line runs, so the env file itself holds no secret."""
    lines = [f"export {k}={v}" for k, v in sorted(service.client_env.items())]
    password_file = service.extra.get("admin_password_file")
    if password_file:
        lines.append(f'export MLFLOW_TRACKING_PASSWORD="$(cat {password_file})"')
    return lines


def _print_env(service: Service, shell: bool) -> None:
    for line in _env_lines(service):
        print(line if shell else line.removeprefix("export "))


def _write_env_file(service: Service) -> Path | None:
    """``<state>/<name>.env``: ``export`` lines a shell can source before using the service."""
    if not service.state_dir:
        return None
    path = Path(service.state_dir) / f"{service.name}.env"
    path.write_text("\n".join(_env_lines(service)) + "\n")
    return path


def _env(name: str, default: str | None = None) -> str | None:
    """A default from the environment (a string: argparse converts it with the option's type)."""
    return os.environ.get(name) or default


def _add_mlflow_parser(start_sub, timeout: str | None) -> argparse.ArgumentParser:
    p = start_sub.add_parser("mlflow", help="the MLflow tracking server")
    p.add_argument(
        "--host", default=_env("CFCML_MLFLOW_HOST", LOCALHOST), help="a non-loopback address needs --allow-remote"
    )
    p.add_argument("--port", type=int, default=_env("CFCML_MLFLOW_PORT", str(MLFLOW_DEFAULT_PORT)))
    p.add_argument(
        "--backend-uri",
        default=None,
        help="default: $MLFLOW_BACKEND_STORE_URI, else sqlite:///<state>/mlflow.db (a URI with a password "
        "belongs in that variable: a command line is visible to every user in ps)",
    )
    p.add_argument(
        "--artifacts-destination", default=None, help="default: $MLFLOW_ARTIFACTS_DESTINATION, else <state>/mlartifacts"
    )
    p.add_argument(
        "--allow-remote",
        action="store_true",
        help="serve a non-loopback --host, with MLflow's basic-auth app (admin password in <state>)",
    )
    p.add_argument("--allowed-hosts", default=None, help="MLflow --allowed-hosts (Host-header check)")
    p.add_argument("--workers", type=int, default=_env("MLFLOW_WORKERS", "1"))
    p.add_argument("--timeout", type=float, default=timeout)
    return p


def _add_ray_parser(start_sub, timeout: str | None) -> argparse.ArgumentParser:
    p = start_sub.add_parser("ray", help="a local Ray head")
    p.add_argument("--port", type=int, default=_env("CFCML_RAY_PORT", str(RAY_DEFAULT_PORT)))
    p.add_argument(
        "--dashboard-port", type=int, default=_env("CFCML_RAY_DASHBOARD_PORT", str(RAY_DEFAULT_DASHBOARD_PORT))
    )
    p.add_argument("--num-cpus", type=int, default=_env("CFCML_RAY_NUM_CPUS"), help="default: nproc")
    p.add_argument("--num-gpus", type=int, default=_env("CFCML_RAY_NUM_GPUS"))
    p.add_argument("--auth-mode", choices=RAY_AUTH_MODES, default=_env("RAY_AUTH_MODE", "token"))
    p.add_argument(
        "--node-ip-address",
        default=_env("CFCML_RAY_NODE_IP", LOCALHOST),
        help="default 127.0.0.1: single node, every port on loopback; another address needs token auth",
    )
    p.add_argument("--timeout", type=float, default=timeout)
    return p


def add_dev_arguments(parser: argparse.ArgumentParser) -> None:
    """`start [mlflow|ray|s3]`, `stop [mlflow|ray|s3|all]`, `status`, `env`; defaults from the
    environment variables the shell scripts (mlflow/start.sh, cluster/start_local.sh) honour."""
    parser.add_argument(
        "--state-dir",
        default=_env("CFCML_STATE_DIR", str(default_state_dir())),
        help="where pids, logs and data live (default: $CFCML_STATE_DIR, else <repo>/.cfcml-state)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    timeout = _env("CFCML_SERVICE_TIMEOUT", "180")
    start = sub.add_parser(
        "start", help="start services in the background (default: the MLflow server, then the Ray head)"
    )
    start_sub = start.add_subparsers(dest="service", metavar="{mlflow,ray,s3}")
    mlflow = _add_mlflow_parser(start_sub, timeout)
    ray = _add_ray_parser(start_sub, timeout)
    p = start_sub.add_parser("s3", help="a local S3 (moto)")
    p.add_argument("--port", type=int, default=None, help="default: a free port")
    p.add_argument("--timeout", type=float, default=60.0)
    start.set_defaults(stack_parsers={"mlflow": mlflow, "ray": ray})

    stop = sub.add_parser("stop", help="stop a service (default: all) by its recorded process id")
    stop.add_argument("service", nargs="?", default="all", choices=(*SERVICE_NAMES, "all"))
    stop.add_argument("--timeout", type=float, default=30.0)

    status = sub.add_parser("status", help="show recorded services")
    status.add_argument("--json", action="store_true")

    env_cmd = sub.add_parser("env", help="print the client environment of a running service")
    env_cmd.add_argument("service", choices=SERVICE_NAMES)
    env_cmd.add_argument("--shell", action="store_true", help="print `export` lines")


def _start(state: Path, name: str, args: argparse.Namespace) -> Service:
    if name == "mlflow":
        if args.backend_uri and redact(args.backend_uri) != args.backend_uri:
            print(
                "warning: --backend-uri holds a credential, visible in ps while this command runs; "
                "pass it in MLFLOW_BACKEND_STORE_URI instead",
                file=sys.stderr,
            )
        return start_mlflow_server(
            state,
            port=args.port,
            backend_uri=args.backend_uri or _env("MLFLOW_BACKEND_STORE_URI", _env("MLFLOW_BACKEND_URI")),
            artifacts_destination=args.artifacts_destination or os.environ.get("MLFLOW_ARTIFACTS_DESTINATION"),
            host=args.host,
            workers=args.workers,
            timeout=args.timeout,
            allow_remote=args.allow_remote,
            allowed_hosts=args.allowed_hosts,
        )
    if name == "ray":
        return start_ray_head(
            state,
            num_cpus=args.num_cpus,
            port=args.port,
            dashboard_port=args.dashboard_port,
            num_gpus=args.num_gpus,
            auth_mode=args.auth_mode,
            timeout=args.timeout,
            node_ip=args.node_ip_address,
        )
    return start_moto_s3(args.port, state_dir=state, timeout=args.timeout)


def _start_and_report(state: Path, name: str, args: argparse.Namespace) -> None:
    try:
        service = _start(state, name, args)
    except ServiceAlreadyRunning as e:
        print(f"{e.service.name}: already running (pid {e.service.pid}) at {e.service.url}")
        _write_env_file(e.service)
        return
    env_file = _write_env_file(service)
    if service.extra.get("warning"):
        print(f"warning: {service.extra['warning']}", file=sys.stderr)
    print(f"{service.name}: started (pid {service.pid}) at {service.url}")
    print(f"{service.name}: log {service.log_path}")
    if env_file:
        print(f"{service.name}: client environment in {env_file} (source it)")


def _stop(state: Path, which: str, timeout: float) -> None:
    """Stop one service or all; with all, one that fails to stop does not keep the others running."""
    failed = []
    for name in STOP_ORDER if which == "all" else (which,):
        try:
            service = load_service(state, name)
            if service is None:
                if which != "all":
                    print(f"{name}: not running (no state in {state})")
                continue
            service.stop(timeout=timeout)
        except ServiceError as e:
            failed.append(e)
            continue
        with contextlib.suppress(FileNotFoundError):
            (state / f"{name}.env").unlink()
        print(f"{name}: stopped (pid {service.pid})")
    if failed:
        raise ServiceError("; ".join(str(e) for e in failed))


def _status(state: Path, as_json: bool) -> None:
    rows = []
    for name in SERVICE_NAMES:
        service = load_service(state, name)
        if service is not None:
            rows.append({**json.loads(service.to_json()), "running": service.is_running()})
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    for row in rows:
        flag = "running" if row["running"] else "dead (stale state)"
        print(f"{row['name']}: {flag}, pid {row['pid']}, {row['url']}, log {row['log_path']}")
    if not rows:
        print(f"no services recorded in {state}")


def _print_client_env(state: Path, name: str, shell: bool) -> int:
    service = load_service(state, name)
    if service is None or not service.is_running():
        print(f"{name}: not running (state dir {state})", file=sys.stderr)
        return 1
    _print_env(service, shell)
    return 0


def run_dev(args: argparse.Namespace) -> int:
    """Run parsed `add_dev_arguments` options: 0 done, 2 refused (bad input), 1 a service failed."""
    state = Path(args.state_dir).resolve()
    try:
        if args.command == "start":
            if args.service is not None:
                _start_and_report(state, args.service, args)
            else:  # the dev stack, each service with its defaults (environment included)
                for name in DEV_STACK:
                    _start_and_report(state, name, args.stack_parsers[name].parse_args([]))
            return 0
        if args.command == "stop":
            _stop(state, args.service, args.timeout)
            return 0
        if args.command == "status":
            _status(state, args.json)
            return 0
        if args.command == "env":
            return _print_client_env(state, args.service, args.shell)
    except ServiceRefused as e:
        print(f"error: {redact(e)}", file=sys.stderr)
        return 2
    except ServiceError as e:
        print(f"error: {redact(e)}", file=sys.stderr)
        return 1
    return 2


def main(argv: list[str] | None = None) -> int:
    """``python -m cfcml.platform.services ...``: the same commands as ``cfcml dev ...``."""
    parser = argparse.ArgumentParser(prog="python -m cfcml.platform.services", description=DESCRIPTION)
    add_dev_arguments(parser)
    return run_dev(parser.parse_args(argv))
