"""The training core: what every method (fine-tune, learn, prune, a language-model method to come) runs on.

- ``glue``: the GLUE task table and its loader; ``data``: the examples a run uses;
- ``batching``: tokenize a split once, serve length-bucketed padded batches;
- ``config``: ``FinetuneConfig``, the run configuration every method's config extends;
- ``loop``: the loop's phases (device, precision, seed, optimiser and schedule, the training step);
- ``evaluate`` and ``metrics``: predictions, GLUE's metrics, the plan's sparsity on the evaluation data;
- ``record``: a run's results record (its key, versions, device, results.json);
- ``finetune``: one fine-tuning run, made of the phases above;
- ``methods``: the registry of run methods that sweeps dispatch through.

The core imports no method; methods (``sparseattn.learned``, ``sparseattn.pruning``) import the core.
"""
