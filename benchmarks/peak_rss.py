"""Run a command and write its peak RSS, measured from a small parent process.

    python -m benchmarks.peak_rss OUT.json CMD [ARGS...]

Why a launcher: Linux's ru_maxrss of a child keeps the high-water mark of the address space
it was forked (or vforked) from, so a child of a benchmark process holding a learner (~2 GB)
reports at least that, whatever it used after exec. Forked from this small process instead,
the command's ru_maxrss is its own (or this launcher's ~15 MiB, whichever is larger).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time


def main(argv: list[str]) -> int:
    out, cmd = argv[0], argv[1:]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    with open(out, "w", encoding="utf-8") as f:
        json.dump({"wall_s": wall, "max_rss_kib": usage.ru_maxrss, "returncode": code}, f)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
