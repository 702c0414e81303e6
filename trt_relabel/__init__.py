"""trt-relabel: re-label image classification data with a strong teacher and train on the label maps."""

__version__ = "0.1.0"
