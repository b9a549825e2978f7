"""Observability: what a run reports and where it goes. metrics.jsonl, the window of training scalars, MFU
(metrics.py); the trackers that receive them, TensorBoard, wandb and MLflow (trackers.py); where a step's time
goes, its named ranges and the PyTorch profiler (timing.py); GPU memory snapshots and the out-of-memory sentence
(memory.py).

Imports: the foundation, parallel (a window's scalars are summed over the ranks).
"""
