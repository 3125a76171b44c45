"""moe-platform: elastic Mixture-of-Experts training and serving on one Ray cluster."""

__version__ = "0.1.0"
