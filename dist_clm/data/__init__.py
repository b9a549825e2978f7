"""Data: a corpus (files, a Hugging Face dataset, a bucket) tokenized once into MosaicML Streaming MDS shards
(`dist-clm prepare`, also in parts over many machines), and a run's training batches streamed from those
shards and packed into blocks on the fly, in an order that is one integer away from any step (loader.py); the
blocks and documents behind any step, recomputed from that order (step_blocks.py).

Imports: the foundation only (errors, console, fsutil, config).
"""
