"""Checks that a built wheel holds what pushd needs at run time besides its modules.

Usage: python .ci/check_wheel.py dist/pushd-*.whl

setuptools leaves out data files it is not told about, and pushd then fails only
when it first needs one (a Lua script at the first publish on Redis, the demo
page at the first visit), so the list comes from the checkout, not from memory.
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def needed() -> set[str]:
    data = [*ROOT.glob("pushd/broker/redis/*.lua"), *ROOT.glob("pushd/static/**/*")]
    if not data:
        raise SystemExit(f"check_wheel: no Lua scripts or static files under {ROOT}/pushd")
    names = {path.relative_to(ROOT).as_posix() for path in data if path.is_file()}
    return names | {"twisted/plugins/pushd_plugin.py", "pushd/py.typed"}


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: check_wheel.py WHEEL", file=sys.stderr)
        return 2
    wheel = Path(sys.argv[1])
    with zipfile.ZipFile(wheel) as archive:
        members = set(archive.namelist())
    problems = [f"missing {name}" for name in sorted(needed() - members)]
    if not any(name.endswith(".dist-info/licenses/LICENSE") for name in members):
        problems.append("missing the LICENSE (dist-info/licenses/LICENSE)")
    # Either file would replace Twisted's own package of that name, or its plugin
    # directory, for every program in the environment.
    problems += [
        f"ships {name}, which shadows Twisted's"
        for name in ("twisted/__init__.py", "twisted/plugins/__init__.py")
        if name in members
    ]
    problems += [f"ships {name}" for name in sorted(members) if name.startswith("tests/")]
    if problems:
        print(f"check_wheel: {wheel.name}: {'; '.join(problems)}", file=sys.stderr)
        return 1
    print(f"ok: {wheel.name} holds the Lua scripts, pushd/static, the plugin and the LICENSE")
    return 0


if __name__ == "__main__":
    sys.exit(main())
