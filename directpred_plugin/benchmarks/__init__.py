"""Bundled comparison benchmarks, installed as ``directpred_plugin.benchmarks`` and run as ``directpred-bench``."""
