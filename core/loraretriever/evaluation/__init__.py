"""Evaluation: the paper's task and retrieval benchmarks, BIG-bench splits, speed benchmarks."""
