"""medvit: volumetric segmentation with local/global-attention transformers."""

__version__ = "0.1.0"
