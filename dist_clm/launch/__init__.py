"""Launch: SLURM through submitit. `dist-clm launch slurm` and the job each task runs, requeued after a
preemption or a lost rank (slurm.py); a prepare in parts as job arrays and its merge (prepare_arrays.py);
what a partition can give, checked before submitting, and the pending reasons that never clear, said while
waiting (partition.py).

Imports: the foundation, data, parallel, training.
"""
