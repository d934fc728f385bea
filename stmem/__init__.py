"""stmem: ST-MEM self-supervised ECG foundation models in JAX / Flax NNX."""
__version__ = "0.1.0"
