"""The program that starts a connector inside its container (stdlib only).

It is copied into every sandbox next to the connector's files and runs as
``python3 /bundle/.streamsvc/runner.py``. It copies the read-only bundle into
the writable working directory, exposes the context, runs the entry point as
``__main__`` and, when the entry point defines ``run(context)``, calls it and
prints its return value as the last stdout line: ``{"ok": true, "result": ...}``
(or the value itself when it already has the ``ok`` shape).
"""

import asyncio
import inspect
import json
import os
import runpy
import shutil
import sys

BUNDLE = "/bundle"
WORK = "/work"


def main() -> int:
    shutil.copytree(BUNDLE, WORK, dirs_exist_ok=True, copy_function=shutil.copyfile)
    context_file = os.path.join(WORK, ".streamsvc", "context.json")
    with open(context_file, encoding="utf-8") as handle:
        context = json.load(handle)
    entry = os.path.join(WORK, os.environ["STREAMSVC_ENTRY_POINT"])
    os.chdir(WORK)
    sys.argv = [entry]
    sys.path.insert(0, os.path.dirname(entry))
    namespace = runpy.run_path(entry, run_name="__main__")
    run = namespace.get("run")
    if callable(run):
        value = run(context)
        if inspect.isawaitable(value):
            value = asyncio.run(_wait(value))
        if not (isinstance(value, dict) and "ok" in value):
            value = {"ok": True, "result": value}
        sys.stdout.flush()
        print(json.dumps(value, default=str), flush=True)
    return 0


async def _wait(value: object) -> object:
    return await value  # type: ignore[misc]


if __name__ == "__main__":
    sys.exit(main())
