"""``agent-gateway image``: build the kernel images of the container profile, and list them."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gateway.environments import EnvironmentProblem, Environments


def add_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    image = commands.add_parser("image", help="Build and list the kernel images of the container profile.")
    image_commands = image.add_subparsers(dest="image_command", required=True)
    build = image_commands.add_parser("build", help="Build the image of each named environment (default: every "
                                      "built one) from Debian packages and the environment, and load it into "
                                      "the engine (no registry). An image the engine has is not built again.")
    build.add_argument("names", nargs="*", metavar="NAME")
    listing = image_commands.add_parser("list", help="The environments' images, and whether the engine has them.")
    listing.add_argument("--json", action="store_true")
    for command in (build, listing):
        command.add_argument("--container-engine", dest="container_engine", default=None,
                             help="the engine's Docker API (env AGENT_GATEWAY_CONTAINER_ENGINE), "
                             "e.g. unix:///run/podman/podman.sock")
        command.add_argument("--envs-dir", dest="envs_dir", default=None,
                             help="the environments' directory (env AGENT_GATEWAY_ENVS_DIR; default ./gateway-envs)")


def run(args: argparse.Namespace, root: Path, engine_url: str | None) -> int:
    """Build or list images; the engine's modules are the server extra's, so they are imported here."""
    from gateway import kernel_image
    from gateway.containers import Engine, EngineUnavailable

    if not engine_url:
        print("agent-gateway image: name the engine with --container-engine URL", file=sys.stderr)
        return 2
    engine = Engine(engine_url, timeout=600)
    environments = Environments(root)
    try:
        built = {environment.name: environment for environment in
                 (environments.current(definition) for definition in environments.definitions()) if environment}
        if args.image_command == "list":
            rows = [{"name": name, "image": kernel_image.image_tag(environment),
                     "present": engine.has_image(kernel_image.image_tag(environment))}
                    for name, environment in sorted(built.items())]
            if args.json:
                print(json.dumps({"engine": engine.describe(), "images": rows}, indent=2))
            else:
                print(engine.describe())
                for row in rows:
                    state = "present" if row["present"] else f"not built: agent-gateway image build {row['name']}"
                    print(f"  {row['name']:<20} {row['image']}  {state}")
            return 0
        unknown = [name for name in args.names if name not in built]
        if unknown:
            print(f"agent-gateway image build: no built environment {', '.join(unknown)} (agent-gateway env list)",
                  file=sys.stderr)
            return 1
        say(engine.describe())
        for name in args.names or sorted(built):
            kernel_image.build(built[name], engine, root / kernel_image.IMAGES_DIR, say)
        return 0
    except (EngineUnavailable, EnvironmentProblem) as exc:
        print(f"agent-gateway image: {exc}", file=sys.stderr)
        return 1


def say(line: str) -> None:
    print(line, flush=True)
