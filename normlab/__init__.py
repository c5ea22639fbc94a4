"""normlab: batch normalization that works at any batch size and under any batch construction.

The public API is what this module and its subpackages re-export.
"""

from normlab import functional, nn

__version__ = "0.1.0"

__all__ = ["__version__", "functional", "nn"]
