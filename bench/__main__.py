"""`make bench`: run every ``bench/bench_*.py`` (each has ``run(env)`` -> lines) and print a report.

Every figure is printed next to a floor measured in the same run on the same machine.
Pass module names to run a subset: ``python -m bench gateway redirect``.
"""
from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path

from bench.common import BenchEnv


def main(argv: list[str]) -> int:
    here = Path(__file__).parent
    names = sorted(m.name for m in pkgutil.iter_modules([str(here)]) if m.name.startswith("bench_"))
    if argv:
        names = [n for n in names if n.removeprefix("bench_") in argv]
    report: list[str] = []
    with BenchEnv.start() as env:
        for name in names:
            module = importlib.import_module(f"bench.{name}")
            print(f"== {name}", flush=True)
            report.append(f"== {name}")
            for line in module.run(env):  # a list, or lines as they come
                print("  " + line, flush=True)
                report.append("  " + line)
    out = here / "results"
    out.mkdir(exist_ok=True)
    (out / "latest.txt").write_text("\n".join(report) + "\n")
    print(f"report written to {out / 'latest.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
