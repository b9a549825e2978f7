"""Run a `dist-clm` command in this process with every fsync and rename recorded, in order; the record goes
to the JSON file named by the first argument (tests/integration/checkpointing/test_run_integrity.py checks
durability with it).

    python tests/fsync_probe.py RECORD.json train|prepare ...
"""

from __future__ import annotations

import json
import os
import sys


def main() -> int:
    record_path, argv = sys.argv[1], sys.argv[2:]
    events: list[list[str]] = []
    real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace

    def fsync(fd):
        real_fsync(fd)
        events.append(["fsync", os.readlink(f"/proc/self/fd/{fd}")])

    def rename(src, dst, *a, **k):
        real_rename(src, dst, *a, **k)
        events.append(["rename", os.path.abspath(src), os.path.abspath(dst)])

    def replace(src, dst, *a, **k):
        real_replace(src, dst, *a, **k)
        events.append(["rename", os.path.abspath(src), os.path.abspath(dst)])

    os.fsync, os.rename, os.replace = fsync, rename, replace
    from dist_clm.cli import main as cli

    code = cli(argv)
    with open(record_path, "w") as f:
        json.dump(events, f)
    return code


if __name__ == "__main__":
    sys.exit(main())
