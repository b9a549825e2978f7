"""Evaluation: perplexity and bits per byte (perplexity.py), downstream tasks through lm-evaluation-harness
(downstream.py), sampling (generate.py), and weights for inference and the Hugging Face export (export.py).

Imports: the foundation, data, models, parallel, checkpointing.
"""
