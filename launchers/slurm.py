#!/usr/bin/env python3
"""Submit dist_clm training to SLURM with submitit; the same as `dist-clm launch slurm` (see --help).

    python launchers/slurm.py --nodes 2 --gpus-per-node 8 --partition gpu --time 1440 \
        --config configs/llama-1b.yaml data.path=/data/web run.dir=/runs/llama1b
"""

import sys

from dist_clm.cli import main

if __name__ == "__main__":
    sys.exit(main(["launch", "slurm", *sys.argv[1:]]))
