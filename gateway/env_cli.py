"""``agent-gateway env``: list, build, check and remove the kernel environments."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from gateway.environments import (
    Definition,
    Environment,
    EnvironmentProblem,
    Environments,
    human_size,
    tree_size,
)


def add_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    env = commands.add_parser("env", help="List, build, check and remove the kernels' environments.")
    env_commands = env.add_subparsers(dest="env_command", required=True)
    listing = env_commands.add_parser("list", help="The environments the kernel specs define, and what is built.")
    listing.add_argument("--json", action="store_true", help="print them as JSON (with their packages)")
    build = env_commands.add_parser("build", help="Build environments (default: every one defined); a built one "
                                    "is reused. With --requirements, define NAME from a requirements file first.")
    build.add_argument("names", nargs="*", metavar="NAME")
    build.add_argument("--requirements", type=Path, default=None,
                       help="a requirements file: resolved into NAME's lock (versions and hashes), then built")
    build.add_argument("--python", default=None, help="the interpreter to build with (default: the gateway's base)")
    check = env_commands.add_parser("check", help="Check built environments: the kernel starts, and every "
                                    "installed file matches its recorded hash. Exit 1 on a problem.")
    check.add_argument("names", nargs="*", metavar="NAME")
    remove = env_commands.add_parser("remove", help="Remove the builds of NAME (--stale: only those its lock no "
                                     "longer gives; --definition: also an operator's spec).")
    remove.add_argument("name", metavar="NAME")
    remove.add_argument("--stale", action="store_true")
    remove.add_argument("--definition", action="store_true")
    for command in (listing, build, check, remove):
        command.add_argument("--envs-dir", dest="envs_dir", default=None,
                             help="the environments' directory (env AGENT_GATEWAY_ENVS_DIR; default ./gateway-envs)")


def run(args: argparse.Namespace, root: Path) -> int:
    environments = Environments(root)
    try:
        if args.env_command == "list":
            return list_command(environments, args.json)
        if args.env_command == "build":
            return build_command(environments, args)
        if args.env_command == "check":
            return check_command(environments, args.names)
        return remove_command(environments, args)
    except EnvironmentProblem as exc:
        print(f"agent-gateway env: {exc}", file=sys.stderr)
        return 1


def say(line: str) -> None:
    print(line, flush=True)


def list_command(environments: Environments, as_json: bool) -> int:
    rows: list[dict[str, Any]] = []
    for definition in environments.definitions():
        current = environments.current(definition)
        rows.append({"name": definition.name, "hash": definition.digest, "spec": str(definition.spec_dir),
                     "built": current is not None, "path": str(current.path) if current else None,
                     "python": current.python_version if current else None,
                     "packages": current.packages if current else {}})
    current_paths = {row["path"] for row in rows}
    stale = [{"name": e.name, "hash": e.digest, "path": str(e.path)} for e in environments.built()
             if str(e.path) not in current_paths]
    if as_json:
        print(json.dumps({"root": str(environments.root), "environments": rows, "stale": stale}, indent=2))
        return 0
    print(f"environments in {environments.root}")
    for row in rows:
        state = f"built, {len(row['packages'])} packages, Python {row['python']}" if row["built"] else \
            f"not built: agent-gateway env build {row['name']}"
        print(f"  {row['name']:<20} {row['hash'][:12]}  {state}")
    for old in stale:
        print(f"  {old['name']:<20} {old['hash'][:12]}  stale (its lock changed): agent-gateway env remove "
              f"{old['name']} --stale")
    return 0


def build_command(environments: Environments, args: argparse.Namespace) -> int:
    if args.requirements is not None:
        if len(args.names) != 1:
            print("agent-gateway env build: --requirements needs exactly one NAME", file=sys.stderr)
            return 2
        definitions = [environments.define(args.names[0], args.requirements, say, args.python)]
    else:
        definitions = _chosen(environments, args.names)
        if args.python:
            definitions = [Definition.of_spec(d.spec_dir, args.python) or d for d in definitions]
    quiet = not sys.stdout.isatty()
    for definition in definitions:
        environments.build(definition, say, quiet=quiet)
    return 0


def check_command(environments: Environments, names: list[str]) -> int:
    failed = 0
    for definition in _chosen(environments, names):
        current = environments.current(definition)
        if current is None:
            print(f"{definition.name}: not built (agent-gateway env build {definition.name})")
            failed += 1
            continue
        problems = environments.check(current)
        for problem in problems:
            print(f"{definition.name}: {problem}")
        if not problems:
            print(f"{definition.name}: ok ({len(current.packages)} packages, {human_size(tree_size(current.path))}, "
                  f"{current.path})")
        failed += bool(problems)
    return 1 if failed else 0


def remove_command(environments: Environments, args: argparse.Namespace) -> int:
    definitions = {d.name: d for d in environments.definitions()}
    definition = definitions.get(args.name)
    current = environments.current(definition) if definition else None
    doomed: list[Environment] = [e for e in environments.built() if e.name == args.name
                                 and not (args.stale and current is not None and e.path == current.path)]
    for environment in doomed:
        environments.remove(environment)
        say(f"removed {environment.path}")
    if args.definition:
        if definition is None or definition.spec_dir.parent != environments.specs_dir:
            print(f"agent-gateway env remove: '{args.name}' is not an operator's environment", file=sys.stderr)
            return 1
        import shutil

        shutil.rmtree(definition.spec_dir)
        say(f"removed the definition {definition.spec_dir}")
    if not doomed and not args.definition:
        say(f"{args.name}: nothing to remove")
    return 0


def _chosen(environments: Environments, names: list[str]) -> list[Definition]:
    if not names:
        return environments.definitions()
    return [environments.definition(name) for name in names]
