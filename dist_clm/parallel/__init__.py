"""Parallelism: how a model and its work are split over ranks. Who each process is and bringing up the process
group under every launcher (process_group.py); the few collectives dist_clm issues and their timeouts
(collectives.py); each rank's sign of life (heartbeat.py); where DeepSpeed's compiled ops are built (ops.py);
what the train, optim and distributed sections mean for DeepSpeed's ZeRO engine (engine.py); a model built and
loaded partitioned under ZeRO-3, from the same initial weights whatever the split (partitioned.py); whether the
parallel settings fit the ranks, the model and the blocks, without torch (fit.py); Ulysses sequence parallelism
(sequence_parallel.py); the step's one agreement between ranks (agreement.py); every byte of a run planned before
it starts, per rank, per node and on disk, and the overrides that make a run fit, without torch (memory_plan.py).

Imports: the foundation, models.
"""
