"""Experiments: GLUE data, fine-tuning under a plan, sweeps with a results database, reports."""
