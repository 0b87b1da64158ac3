"""open-release: a DVC pipeline that makes complete, checkable releases of preference-tuned models."""

__version__ = "0.1.0"
