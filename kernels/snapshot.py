"""Kernel-side code that saves and restores a session's state (run inside the kernel).

The gateway executes this file's text silently in the kernel, in a private namespace holding
``ACTION`` ("save" or "load") and ``DIRECTORY``; nothing is added to the user's namespace.

- save: the user namespace is pickled with cloudpickle, jointly (so ``b = a`` stays one
  object); modules bound to names are kept by module name and re-imported on load; what
  cannot be pickled is found by probing names one by one and reported by name and type.
  IPython's execution count and input history are kept, so numbering continues.
- load: the reverse, reporting what was restored and what could not be.

The result is written to ``DIRECTORY/snapshot.json``; the pickled namespace to
``DIRECTORY/namespace.pkl``. Both are written to temporary names and renamed.
"""

import importlib
import json
import os
import types

import cloudpickle

SKIP = {"In", "Out", "exit", "quit", "get_ipython", "open"}


def _user_names(shell):
    hidden = shell.user_ns_hidden
    return [name for name, value in shell.user_ns.items()
            if not name.startswith("_") and name not in SKIP and (name not in hidden or hidden[name] is not value)]


def _write(path, data, mode="wb"):
    temporary = path + ".tmp"
    with open(temporary, mode) as handle:
        handle.write(data)
    os.replace(temporary, path)


def _describe(name, value, error):
    kind = type(value)
    return {"name": name, "type": f"{kind.__module__}.{kind.__qualname__}", "error": str(error)[:300]}


def save(shell, directory):
    namespace = shell.user_ns
    modules, values = {}, {}
    for name in _user_names(shell):
        value = namespace[name]
        if isinstance(value, types.ModuleType):
            modules[name] = value.__name__
        else:
            values[name] = value
    failed = []
    try:
        blob = cloudpickle.dumps(values)
    except Exception:
        for name in list(values):
            try:
                cloudpickle.dumps(values[name])
            except Exception as error:
                failed.append(_describe(name, values.pop(name), error))
        blob = cloudpickle.dumps(values)
    history = shell.history_manager
    state = {
        "saved": sorted(values), "modules": modules, "failed": failed, "bytes": len(blob),
        "execution_count": shell.execution_count,
        "input_raw": list(history.input_hist_raw), "input_parsed": list(history.input_hist_parsed),
    }
    _write(os.path.join(directory, "namespace.pkl"), blob)
    _write(os.path.join(directory, "snapshot.json"), json.dumps(state), "w")
    return state


def load(shell, directory):
    with open(os.path.join(directory, "snapshot.json")) as handle:
        state = json.load(handle)
    restored, failed = [], []
    for name, module in state["modules"].items():
        try:
            shell.user_ns[name] = importlib.import_module(module)
            restored.append(name)
        except Exception as error:
            failed.append({"name": name, "type": "module " + module, "error": str(error)[:300]})
    with open(os.path.join(directory, "namespace.pkl"), "rb") as handle:
        try:
            values = cloudpickle.load(handle)
        except Exception as error:
            values = {}
            failed.extend({"name": name, "type": "unknown", "error": str(error)[:300]} for name in state["saved"])
    shell.user_ns.update(values)
    restored.extend(values)
    shell.execution_count = state["execution_count"]
    history = shell.history_manager
    history.input_hist_raw[:] = state["input_raw"]
    history.input_hist_parsed[:] = state["input_parsed"]
    result = {"restored": sorted(restored), "failed": failed + state["failed"],
              "execution_count": state["execution_count"]}
    _write(os.path.join(directory, "restore.json"), json.dumps(result), "w")
    return result


if ACTION == "save":  # noqa: F821 (given by the gateway)
    save(get_ipython(), DIRECTORY)  # noqa: F821
elif ACTION == "load":  # noqa: F821
    load(get_ipython(), DIRECTORY)  # noqa: F821
