"""Evaluation: perplexity and bits per byte (perplexity.py), downstream tasks through lm-evaluation-harness
(downstream.py), sampling (generate.py), weights for inference and the Hugging Face export (export.py), a
tensor-parallel checkpoint's shards joined into whole parameters (shards.py), and where an inference model's
weights go: one device or spread over the GPUs (placement.py).

Imports: the foundation, data, models, parallel, checkpointing.
"""
