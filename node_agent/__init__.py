"""OptimaGPT node agent: a standalone program (no Django) that serves GGUF models to a gateway."""

__version__ = "0.1.0"
