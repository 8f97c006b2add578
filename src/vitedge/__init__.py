"""vitedge: fast, cheap vision encoders for VLMs on edge hardware."""

__version__ = "0.1.0"
