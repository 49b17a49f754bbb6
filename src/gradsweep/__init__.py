"""gradsweep: sweeps that record what gradients do, step by step."""
__version__ = "0.1.0"
