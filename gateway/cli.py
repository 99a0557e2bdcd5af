"""The command line: ``agent-gateway serve``, the operators' commands (``token``, ``audit``, ``doctor``) and the
clients of a running gateway (``pause``, ``resume``, ``replay``, ``run``, ``attach``, ``mcp``). The one synchronous edge."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import TYPE_CHECKING, Sequence

from gateway import __version__, env_cli, image_cli
from gateway.settings import REGISTRY, Settings

if TYPE_CHECKING:
    from gateway.store import Store


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agent-gateway", description="Agent Kernel Gateway: persistent, recorded "
                                     "Jupyter kernel sessions for AI agents.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="Start the gateway on its embedded default (SQLite, local kernels).")
    for setting in REGISTRY:
        default = "none" if setting.default is None else setting.default
        serve.add_argument(setting.flag, dest=setting.name, type=setting.type, default=None,
                           help=f"{setting.help} (env {setting.env}; default {default})")

    token = commands.add_parser("token", help="Manage access tokens.")
    token_commands = token.add_subparsers(dest="token_command", required=True)
    create = token_commands.add_parser("create", help="Create a token for a principal and print it once.")
    create.add_argument("--name", required=True)
    create.add_argument("--role", required=True, choices=("agent", "reviewer", "admin"))
    create.add_argument("--data-dir", dest="data_dir", default=None)
    create.add_argument("--init", action="store_true", help="create the data directory's store if there is none yet")
    listing = token_commands.add_parser("list", help="List tokens (names, roles, dates; never the tokens).")
    listing.add_argument("--data-dir", dest="data_dir", default=None)
    revoke = token_commands.add_parser("revoke", help="Revoke a principal's tokens, or one token by id.")
    revoke.add_argument("--name", default=None)
    revoke.add_argument("--id", dest="token_id", type=int, default=None)
    revoke.add_argument("--data-dir", dest="data_dir", default=None)

    audit = commands.add_parser("audit", help="Check or export the audit log.")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_commands.add_parser("verify", help="Check the hash chain; names the first broken event.")
    verify.add_argument("--data-dir", dest="data_dir", default=None)
    export = audit_commands.add_parser("export", help="Write every event as JSON lines.")
    export.add_argument("--output", default="-", help="a file (default: standard output)")
    export.add_argument("--data-dir", dest="data_dir", default=None)

    attach = commands.add_parser("attach", help="Open a live session in JupyterLab (started with --gateway-url).")
    attach.add_argument("session_id")
    attach.add_argument("--jupyter-url", default="http://127.0.0.1:8888", help="the JupyterLab server")
    attach.add_argument("--jupyter-token", default=None, help="its token (env JUPYTER_TOKEN)")
    _client_arguments(attach)
    replay = commands.add_parser("replay", help="Rerun a session (SESSION_ID) or an exported notebook (FILE.ipynb) "
                                 "in a new session and report step by step; exit 1 if any step diverged.")
    replay.add_argument("target")
    _client_arguments(replay)
    run = commands.add_parser("run", help="Execute a notebook's code cells on a gateway session and write the "
                              "executed notebook (as `jupyter execute` does locally); exit 1 if a cell failed.")
    run.add_argument("notebook")
    run.add_argument("--session", default=None, help="run in this session (kept) instead of a new one")
    run.add_argument("--kernel", default=None, help="the new session's kernel (default: the notebook's kernelspec)")
    run.add_argument("--output", default=None, help="where to write the executed notebook "
                     "(default NAME.executed.ipynb beside it)")
    run.add_argument("--inplace", action="store_true", help="overwrite the notebook")
    run.add_argument("--timeout", type=float, default=None, help="seconds each cell may run (default: the server's)")
    run.add_argument("--allow-errors", action="store_true", help="go on past failing cells")
    run.add_argument("--keep", action="store_true", help="do not terminate the new session at the end")
    _client_arguments(run)
    for action, text in (("pause", "Pause a session: save its state, stop its kernel."),
                         ("resume", "Resume a paused session with its state.")):
        command = commands.add_parser(action, help=text)
        command.add_argument("session_id")
        _client_arguments(command)
    mcp = commands.add_parser("mcp", help="Serve the gateway's MCP tools over stdio (for desktop MCP clients), "
                              "forwarding each call to the gateway's /mcp with the token.")
    _client_arguments(mcp)
    env_cli.add_parser(commands)
    image_cli.add_parser(commands)
    doctor = commands.add_parser("doctor", help="Report which kernel isolation profiles work on this machine, and why not.")
    doctor.add_argument("--json", action="store_true", help="print the facts as JSON")
    doctor.add_argument("--container-engine", dest="container_engine", default=None,
                        help="also check the container profile on this engine (env AGENT_GATEWAY_CONTAINER_ENGINE)")
    return parser


def doctor_command(args: argparse.Namespace) -> int:
    """Print which profiles work here; exit 0 when at least one isolating profile does."""
    import json

    from gateway import doctor

    engine = Settings.resolve({"container_engine": args.container_engine} if args.container_engine else {})
    facts = doctor.diagnose(container_engine=engine.container_engine)
    print(json.dumps(facts, indent=2) if args.json else doctor.format_report(facts))
    return 0 if facts.get("recommended", "none") != "none" else 1


def _client_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("--gateway-url", default=None, help="the gateway (default http://HOST:PORT of the settings)")
    command.add_argument("--token", default=None, help="a gateway token (env AGENT_GATEWAY_TOKEN)")


EXTRA_OF_COMMAND = {"mcp": "mcp"}  # the extra each command needs; all others: server


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return dispatch(args)
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.startswith("gateway"):
            raise
        extra = EXTRA_OF_COMMAND.get(args.command, "server")
        print(f"agent-gateway {args.command}: this needs the '{extra}' extra (the module '{exc.name}' is missing): "
              f"pip install 'agent-kernel-gateway[{extra}]'", file=sys.stderr)
        return 2


def dispatch(args: argparse.Namespace) -> int:
    if args.command == "attach":
        return attach_command(args)
    if args.command in ("pause", "resume"):
        return lifecycle_command(args)
    if args.command == "replay":
        return replay_command(args)
    if args.command == "run":
        return run_command(args)
    if args.command == "doctor":
        return doctor_command(args)
    if args.command == "mcp":
        return mcp_command(args)
    if args.command == "env":
        root = Settings.resolve({"envs_dir": args.envs_dir} if args.envs_dir else {}).envs_path
        return env_cli.run(args, root)
    if args.command == "image":
        resolved = Settings.resolve({name: value for name, value in (("envs_dir", args.envs_dir),
                                     ("container_engine", args.container_engine)) if value})
        return image_cli.run(args, resolved.envs_path, resolved.container_engine)
    local = ("command", "token_command", "audit_command", "name", "role", "token_id", "output", "init")
    overrides = {k: v for k, v in vars(args).items() if k not in local}
    settings = Settings.resolve(overrides)
    logging.basicConfig(level=settings.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "serve" and settings.token:
        return serve_without_secrets(settings.token)
    if args.command == "serve":
        from gateway.isolation import IsolationRefused
        from gateway.privileges import PrivilegeError
        from gateway.server import serve

        try:
            serve(settings)
        except (IsolationRefused, PrivilegeError) as exc:
            print(f"agent-gateway: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.command == "token":
        return token_command(args, settings)
    if args.command == "audit":
        return audit_command(args, settings)
    return 2


def serve_without_secrets(token: str) -> int:
    """Start ``serve`` again with the admin token's hash in place of the token, so the token is
    in no process environment or command line (``/proc/<pid>/environ``, ``cmdline``)."""
    from gateway.auth import hash_token

    env = {name: value for name, value in os.environ.items() if name != "AGENT_GATEWAY_TOKEN"}
    env["AGENT_GATEWAY_TOKEN_SHA256"] = hash_token(token)
    argv, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == "--token":
            skip = True
        elif not arg.startswith("--token="):
            argv.append(arg)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "gateway", *argv], env)
    return 2  # not reached


def open_existing_store(settings: Settings, command: str, create: bool = False) -> Store | None:
    """The store of the data directory ``serve`` uses (``--data-dir``, ``AGENT_GATEWAY_DATA_DIR``,
    default ./gateway-data), opened as the directory's owner (a root-run command must not leave
    files the server's user cannot open); None, having said why, when there is none and
    ``create`` is not asked."""
    from gateway.privileges import act_as_owner
    from gateway.store import Store  # noqa: F811 (the module is imported only for type checking above)

    path = settings.data_path / "gateway.db"
    if not path.exists() and not create:
        print(f"agent-gateway {command}: there is no gateway database at {path}. Give the data directory the "
              "server uses (--data-dir or AGENT_GATEWAY_DATA_DIR)" + (", or --init to create one." if command ==
                                                                        "token create" else "."), file=sys.stderr)
        return None
    settings.data_path.mkdir(parents=True, exist_ok=True, mode=0o700)
    act_as_owner(settings.data_path)
    os.umask(0o077)
    return Store(path)


def token_command(args: argparse.Namespace, settings: Settings) -> int:
    from gateway.auth import TokenAuthority

    store = open_existing_store(settings, f"token {args.token_command}", create=getattr(args, "init", False))
    if store is None:
        return 2
    try:
        authority = TokenAuthority(store)
        if args.token_command == "create":
            print(authority.create(args.name, args.role))
        elif args.token_command == "list":
            for row in store.list_tokens():
                state = f"revoked {row['revoked_at']}" if row["revoked_at"] else "active"
                print(f"{row['id']}\t{row['name']}\t{row['role']}\tcreated {row['created_at']}\t{state}")
        elif args.token_command == "revoke":
            if args.name is None and args.token_id is None:
                print("agent-gateway token revoke: give --name or --id.", file=sys.stderr)
                return 2
            count = authority.revoke(name=args.name, token_id=args.token_id)
            print(f"revoked {count} token(s)")
            return 0 if count else 1
    finally:
        store.close()
    return 0


def audit_command(args: argparse.Namespace, settings: Settings) -> int:
    from gateway import audit

    store = open_existing_store(settings, f"audit {args.audit_command}")
    if store is None:
        return 2
    try:
        if args.audit_command == "verify":
            verdict = audit.verify(store.conn)
            if verdict.ok:
                print(f"ok: the audit log's {verdict.checked} events form an unbroken chain")
                return 0
            print(f"BROKEN at event {verdict.broken_id}: {verdict.reason} ({verdict.checked} events before it hold)")
            return 1
        if args.output == "-":
            audit.export(store.conn, sys.stdout)
        else:
            with open(args.output, "w", encoding="utf-8") as out:
                count = audit.export(store.conn, out)
            print(f"wrote {count} events to {args.output}", file=sys.stderr)
    finally:
        store.close()
    return 0


def _gateway_target(args: argparse.Namespace) -> tuple[str, str] | None:
    settings = Settings.resolve({"token": args.token})
    if not settings.token:
        print(f"agent-gateway {args.command}: a gateway token is needed (--token or AGENT_GATEWAY_TOKEN).",
              file=sys.stderr)
        return None
    return args.gateway_url or f"http://{settings.host}:{settings.port}", settings.token


def replay_command(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gateway.http_client import CallError
    from gateway.replay_cli import print_report, replay_notebook, replay_remote

    target = _gateway_target(args)
    if target is None:
        return 2
    url, token = target
    url = url.rstrip("/")
    try:
        if args.target.endswith(".ipynb"):
            report = replay_notebook(url, token, Path(args.target))
        else:
            report = replay_remote(url, token, args.target)
    except (CallError, OSError, ValueError) as exc:
        print(f"agent-gateway replay: {exc}", file=sys.stderr)
        return 2
    print_report(report)
    return 0 if report["reproduced"] else 1


def run_command(args: argparse.Namespace) -> int:
    from pathlib import Path

    import nbformat

    from gateway.client import Gateway, GatewayError
    from gateway.run_notebook import print_progress, run

    target = _gateway_target(args)
    if target is None:
        return 2
    source = Path(args.notebook)
    output = source if args.inplace else Path(args.output or source.with_name(f"{source.stem}.executed.ipynb"))
    try:
        with Gateway(target[0], target[1]) as gateway:
            outcome = run(gateway, source, session_id=args.session, kernel=args.kernel, timeout=args.timeout,
                          allow_errors=args.allow_errors, keep=args.keep, on_cell=print_progress)
    except (GatewayError, OSError, ValueError) as exc:
        print(f"agent-gateway run: {exc}", file=sys.stderr)
        return 2
    nbformat.write(outcome.notebook, str(output))
    print(f"{output} ({outcome.executed} cells run in session {outcome.session_id})")
    if outcome.failed is not None:
        index, step = outcome.failed
        error = step.error
        print(f"agent-gateway run: cell {index} failed ({step.status}: "
              f"{error.name + ': ' + error.value if error else 'no error'}); the notebook is written up to it.",
              file=sys.stderr)
        return 1
    return 0


def mcp_command(args: argparse.Namespace) -> int:
    import anyio

    from gateway.mcp_stdio import serve_stdio

    target = _gateway_target(args)
    if target is None:
        return 2
    try:
        anyio.run(serve_stdio, *target)
    except OSError as exc:
        print(f"agent-gateway mcp: cannot reach the gateway at {target[0]}: {exc}", file=sys.stderr)
        return 2
    return 0


def lifecycle_command(args: argparse.Namespace) -> int:
    import json

    from gateway.http_client import CallError, call

    target = _gateway_target(args)
    if target is None:
        return 2
    url, token = target
    try:
        session = call("POST", f"{url.rstrip('/')}/v1/sessions/{args.session_id}/{args.command}", token, {})
    except CallError as exc:
        print(f"agent-gateway {args.command}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(session, indent=2))
    return 0


def attach_command(args: argparse.Namespace) -> int:
    import os

    from gateway.attach import AttachError, attach

    target = _gateway_target(args)
    if target is None:
        return 2
    gateway_url, token = target
    try:
        url = attach(gateway_url, token, args.session_id, args.jupyter_url,
                     args.jupyter_token or os.environ.get("JUPYTER_TOKEN"))
    except AttachError as exc:
        print(f"agent-gateway attach: {exc}", file=sys.stderr)
        return 1
    print(f"Session {args.session_id} is attached. Open {url}")
    return 0
