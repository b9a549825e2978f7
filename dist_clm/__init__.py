"""dist_clm: streaming, distributed pretraining of causal language models.

The packages follow the pipeline, from the bottom up: each imports only what is listed before it (or itself),
never what comes after it. The top-level modules are the foundation (the first row) and the entry points (the
last); names on one row are ordered too, left to right:

    errors, console, fsutil, config   what every stage uses: one-sentence errors, the console, durable files,
                                      the typed run configuration
    data/            a corpus -> MDS shards (prepare), and a run's batches streamed from them
    models/          decoders: presets and building, attention paths, the fused loss head, Mixture-of-Experts
    parallel/        the model and its work split over ranks: process groups, collectives and their timeouts,
                     the DeepSpeed engine's configuration, sequence parallelism, the ranks' agreement
    observability/   what a run reports: metrics, MFU, trackers (TensorBoard, wandb, MLflow)
    checkpointing/   checkpoints (chosen, saved in the background, resumed) and the run directory
    evaluation/      perplexity, downstream tasks, generation, the Hugging Face export
    training/        the loop, the step, set-up, objectives, stability, stopping on a signal
    launch/          SLURM through submitit: training jobs, requeues, a prepare in parts as job arrays
    quickstart, cli  the `dist-clm` command and its quick start

tests/unit/test_layout.py reads every import and holds the code to this order.
"""

__version__ = "0.1.0"
