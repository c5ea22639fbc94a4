"""normlab: batch normalization that works at any batch size and under any batch construction.

The public API is what this module and its subpackages re-export:

- :mod:`normlab.functional`: pure math (moments, BN forward/backward);
- :mod:`normlab.nn`: layers (``BatchNorm1d/2d``, ``BatchRenorm1d/2d``, ...) and model surgery;
- :mod:`normlab.optim`: ``BNPreconditioner`` (BNP: preconditioned gradients, no BN layer);
- :mod:`normlab.diagnostics`: Hessian spectrum, loss landscape, covariate shift, gradient flow;
- :mod:`normlab.methods`: the method registry; :func:`convert` swaps a model's normalization;
- :mod:`normlab.models`, :mod:`normlab.data`, :mod:`normlab.train`: the training platform;
- :mod:`normlab.experiments`: registered experiments (``normlab run <name>``).
"""

from normlab import data, diagnostics, functional, models, nn, optim
from normlab._version import __version__
from normlab.methods import (
    METHODS,
    Method,
    convert,
    get_method,
    list_methods,
    register_method,
    resolve_method,
)

__all__ = [
    "METHODS",
    "Method",
    "__version__",
    "convert",
    "data",
    "diagnostics",
    "functional",
    "get_method",
    "list_methods",
    "models",
    "nn",
    "optim",
    "register_method",
    "resolve_method",
]
