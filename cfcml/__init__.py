"""CFCML: coarse-to-fine crossmodal learning for disease diagnosis."""

__version__ = "0.1.0"
