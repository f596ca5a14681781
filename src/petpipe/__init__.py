"""petpipe: fastai lesson 1 as a reproducible DVC + PyTorch + MLflow pipeline."""

__version__ = "0.1.0"
