"""GPU benchmarks of sparse attention: kernels (``attention``) and whole models (``model``)."""
