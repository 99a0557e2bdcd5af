"""The IPython extension every gateway environment loads in its kernels (installed into the
environment's site-packages at build, enabled by its ``etc/ipython/ipython_kernel_config.py``).

- ``%pip`` runs pip in the kernel's environment as IPython's own magic does, but a pip that
  exits non-zero makes the cell fail (``PipFailed``), so the step is recorded as an error; with
  no package index reachable it says how to get a package.
- Unless an index is configured (``PIP_INDEX_URL``), pip is told it has none (``PIP_NO_INDEX``):
  a kernel has no network, and pip fails at once instead of retrying a connection.
- The environment's matplotlib font cache, built with it, is put where matplotlib looks for it
  (the kernel's home is new at every start), so the first plot does not rebuild it.
"""

import os
import shutil
import sys

FONT_CACHE = os.path.join(sys.prefix, "share", "agent-gateway", "matplotlib")
NO_INDEX_HINT = (
    "This kernel has no package index: its sandbox has no network. Use an environment that has "
    "the package (GET /api/kernelspecs lists the environments and their packages), or ask an "
    "operator to build one (agent-gateway env build) or to allow a package index for the session."
)


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
        if status:
            hint = NO_INDEX_HINT if os.environ.get("PIP_NO_INDEX") == "1" else ""
            raise PipFailed(f"pip exited with status {status}. {hint}".strip())
        print("Note: you may need to restart the kernel to use updated packages.")

    return pip


def _quote(path):
    return f'"{path}"' if " " in path else path


def load_ipython_extension(shell):
    if not os.environ.get("PIP_INDEX_URL"):
        os.environ["PIP_NO_INDEX"] = "1"
    os.environ.setdefault("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    seed_font_cache()
    shell.register_magic_function(pip_magic(shell), "line", "pip")
