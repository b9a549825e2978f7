"""`python -m dist_clm ...` (what the deepspeed launcher's --module and torchrun's -m run)."""

from dist_clm.cli import entry

entry()
