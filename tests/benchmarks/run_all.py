"""Runs every ``bench_*.py`` in this folder in turn (one subprocess each) and prints its table.

`make bench` calls this. Exit status: 0 when every benchmark ran, else 1 (the others still run).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path


def main() -> int:
    here = Path(__file__).resolve().parent
    scripts = sorted(here.glob("bench_*.py"))
    if not scripts:
        print(f"no bench_*.py in {here}")
        return 0
    failed = []
    for script in scripts:
        print(f"## {script.name}\n", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(script)], cwd=here.parent.parent, check=False)
        print(f"\n({script.name}: exit {proc.returncode}, {time.perf_counter() - t0:.0f} s)\n")
        if proc.returncode != 0:
            failed.append(script.name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
