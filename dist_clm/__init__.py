"""dist_clm: streaming, distributed pretraining of causal language models."""

__version__ = "0.1.0"
