"""Benchmarks on the model organism (``vllm_steer.organism``): steering, FASB and L2S runs that
measure behaviour change in vLLM. See ``benchmarks/organism/README.md``."""
