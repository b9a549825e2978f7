"""Training: `train(cfg)`, the loop that tells the story (loop.py); the config settled from the data and every
check possible before the process group and the model (preflight.py); set-up and resume (setup.py); one optimizer
step (step.py); what a run minimizes (objectives.py; DPO and ORPO in preference.py); the loss guard and dropped
updates (stability.py); stopping on a signal at an agreed step (preemption.py); a bad step's documents and their
losses (incidents.py); a run read back from its directory, `dist-clm status` (status.py).

Imports: the foundation, data, models, parallel, observability, checkpointing, evaluation.
"""
