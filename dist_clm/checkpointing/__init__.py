"""Checkpointing: choosing the checkpoint to resume (complete, agreed, past a damaged one) and moving the bytes
of a run's parts and of the engine (checkpointer.py), writing them behind the step (writer.py), and the run
directory's one owner and its files (rundir.py).

Imports: the foundation, data (the data position's names), parallel.
"""
