"""The IPython extension every gateway environment loads in its kernels (installed into the
environment's site-packages at build, enabled by its ``etc/ipython/ipython_kernel_config.py``).

- ``%pip`` runs pip in the kernel's environment as IPython's own magic does, but a pip that
  exits non-zero makes the cell fail (``PipFailed``), so the step is recorded as an error; with
  no package index reachable it says how to get a package.
- Unless the session may reach some host, or an index is configured (``PIP_INDEX_URL``), pip is
  told it has none (``PIP_NO_INDEX``): pip fails at once instead of retrying a connection. The
  session's rules are read before every cell from ``rules.json`` beside the egress socket (the
  gateway rewrites it when an admin changes them).
- The environment's matplotlib font cache, built with it, is put where matplotlib looks for it
  (the kernel's home is new at every start), so the first plot does not rebuild it.
- Given the gateway's egress socket (``AGENT_GATEWAY_EGRESS``), a loopback port inside the
  sandbox is forwarded to it and ``HTTP(S)_PROXY`` point there: the session's egress policy,
  enforced by the gateway, decides what gets out. Given a packages directory in the workspace
  (``AGENT_GATEWAY_PACKAGES``), pip installs there (``PIP_TARGET``) and it comes first on
  ``sys.path``: what a session installs survives pause, resume, fork and restarts. Given a CA
  bundle (``AGENT_GATEWAY_CA_BUNDLE``), Python's ssl, requests, curl and pip trust it.
"""

import importlib
import json
import os
import shutil
import socket
import sys
import threading

FONT_CACHE = os.path.join(sys.prefix, "share", "agent-gateway", "matplotlib")
NO_INDEX_HINT = (
    "This kernel has no package index: its sandbox has no network. Use an environment that has "
    "the package (GET /api/kernelspecs lists the environments and their packages), or ask an "
    "operator to build one (agent-gateway env build) or to allow a package index for the session."
)


def _pump(source, target):
    try:
        while True:
            chunk = source.recv(65536)
            if not chunk:
                break
            target.sendall(chunk)
    except OSError:
        pass
    finally:
        try:
            target.shutdown(socket.SHUT_WR)  # the other way goes on until its own end
        except OSError:
            pass


def _bridge(client, socket_path):
    upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        upstream.connect(socket_path)
    except OSError:
        client.close()
        upstream.close()
        return
    back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
    back.start()
    _pump(client, upstream)
    back.join()
    client.close()
    upstream.close()


def forward_egress(socket_path):
    """Forward a loopback port to the gateway's egress socket; returns the proxy URL."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)

    def accept():
        while True:
            client, _ = listener.accept()
            threading.Thread(target=_bridge, args=(client, socket_path), daemon=True).start()

    threading.Thread(target=accept, name="agent-gateway-egress", daemon=True).start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}"


def trust_bundle(path):
    """Trust the CA certificates the gateway gives (the public roots, the operator's, and its
    egress authority, which answers for the hosts whose credentials the proxy adds)."""
    for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "PIP_CERT"):
        os.environ[name] = path


def use_packages_dir(directory):
    """Put what the session installs first on the path; pip installs there."""
    os.environ["PIP_TARGET"] = directory
    if directory not in sys.path:
        sys.path.insert(1 if sys.path and sys.path[0] == "" else 0, directory)
    paths = [directory, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))


class IndexSwitch:
    """Sets ``PIP_NO_INDEX`` while the session's egress rules allow no host (run before each cell)."""

    def __init__(self, rules_file):
        self.rules_file = rules_file

    def rules(self):
        if not self.rules_file:
            return []
        try:
            with open(self.rules_file, encoding="utf-8") as source:
                return list(json.load(source).get("rules") or [])
        except (OSError, ValueError, AttributeError):
            return []

    def __call__(self, *_):
        if self.rules():
            os.environ.pop("PIP_NO_INDEX", None)
        else:
            os.environ["PIP_NO_INDEX"] = "1"  # no host may be reached: pip fails at once, saying so


EGRESS_HINT = ("Connections leave this kernel only through the gateway's egress proxy, to the hosts the "
               "session's egress rules allow; a refused host is answered 403 and audited.")


class PipFailed(RuntimeError):
    """pip, run by ``%pip``, exited with a non-zero status."""


def _matplotlib_cache_dir():
    configured = os.environ.get("MPLCONFIGDIR")
    if configured:
        return configured
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache_home, "matplotlib")


def seed_font_cache():
    """Copy the environment's font cache into the kernel's matplotlib cache dir, if it has none."""
    if not os.path.isdir(FONT_CACHE):
        return
    target = _matplotlib_cache_dir()
    try:
        os.makedirs(target, exist_ok=True)
        for name in os.listdir(FONT_CACHE):
            if name.startswith("fontlist-") and not os.path.exists(os.path.join(target, name)):
                shutil.copyfile(os.path.join(FONT_CACHE, name), os.path.join(target, name))
    except OSError:
        pass  # matplotlib builds the cache itself


def pip_magic(shell):
    def pip(line):
        """Run pip in the kernel's environment: ``%pip install PACKAGE``. Fails the cell when pip fails."""
        shell.system(" ".join([_quote(sys.executable), "-m", "pip", line]))
        status = shell.user_ns.get("_exit_code", 0)
        importlib.invalidate_caches()  # what was just installed is importable now
        if status:
            hint = NO_INDEX_HINT if os.environ.get("PIP_NO_INDEX") == "1" else EGRESS_HINT
            raise PipFailed(f"pip exited with status {status}. {hint}".strip())
        if os.environ.get("PIP_TARGET"):
            report_packages(os.environ["PIP_TARGET"])
        print("Note: you may need to restart the kernel to use updated packages.")

    return pip


PACKAGES_MIME = "application/vnd.agent-gateway.packages+json"


def layer_packages(directory):
    """``{name: version}`` of the distributions pip installed into ``directory``."""
    packages = {}
    try:
        entries = sorted(os.listdir(directory))
    except OSError:
        return packages
    for entry in entries:
        if not entry.endswith(".dist-info"):
            continue
        fields = {}
        try:
            with open(os.path.join(directory, entry, "METADATA"), encoding="utf-8", errors="replace") as metadata:
                for line in metadata:
                    if not line.strip():
                        break
                    key, _, value = line.partition(":")
                    fields.setdefault(key.strip().lower(), value.strip())
        except OSError:
            continue
        if fields.get("name"):
            packages[fields["name"]] = fields.get("version", "")
    return packages


def report_packages(directory):
    """Display what the session's own layer holds, for the gateway to record with the step."""
    from IPython.display import display

    packages = layer_packages(directory)
    listing = ", ".join(f"{name} {version}" for name, version in packages.items()) or "none"
    display({PACKAGES_MIME: {"directory": directory, "packages": packages},
             "text/plain": f"Packages in this session's own layer ({directory}): {listing}"}, raw=True)


def _quote(path):
    return f'"{path}"' if " " in path else path


def load_ipython_extension(shell):
    egress = os.environ.pop("AGENT_GATEWAY_EGRESS", "")
    if egress:
        proxy = forward_egress(egress)
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
            os.environ[name] = proxy
        for name in ("NO_PROXY", "no_proxy"):
            os.environ.pop(name, None)
    bundle = os.environ.pop("AGENT_GATEWAY_CA_BUNDLE", "")
    if bundle:
        trust_bundle(bundle)
    packages = os.environ.pop("AGENT_GATEWAY_PACKAGES", "")
    if packages:
        use_packages_dir(packages)
    if not os.environ.get("PIP_INDEX_URL"):
        switch = IndexSwitch(os.path.join(os.path.dirname(egress), "rules.json") if egress else "")
        switch()
        shell.events.register("pre_run_cell", switch)
    os.environ.setdefault("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    seed_font_cache()
    shell.register_magic_function(pip_magic(shell), "line", "pip")
