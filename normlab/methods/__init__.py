"""Normalization methods: one complete description per method, in one registry.

A :class:`Method` is a method's layer factory (per slot kind), its optional training hook, one
options mapping that reaches both, and its experiment defaults. Registered, in this order (the
order of :func:`list_methods`): ``none``, ``bn``, ``torch-bn``, ``gn``, ``ln``, ``brn``,
``online-norm``, ``mabn``, ``fn``, the ``fn-<estimator>`` aliases, ``bnp``, ``sync-bn``.
:func:`convert`
swaps the normalization of an existing model.

Families: :mod:`normlab.methods.baselines` (none, gn, ln, online-norm, mabn),
:mod:`normlab.methods.bn` (bn, torch-bn, brn), :mod:`normlab.methods.fn`,
:mod:`normlab.methods.bnp`, :mod:`normlab.methods.sync` (``sync-bn``).
"""

from normlab.methods.base import (
    METHODS,
    Method,
    TrainingHook,
    get_method,
    list_methods,
    register_method,
    resolve_method,
)
from normlab.methods.baselines import GN, LN, MABN, NONE, ONLINE_NORM, group_count
from normlab.methods.bn import BN, BRN, TORCH_BN
from normlab.methods.bnp import BNP
from normlab.methods.convert import convert
from normlab.methods.fn import FN, FN_ALIASES
from normlab.methods.sync import SYNC_BN

for _method in (NONE, BN, TORCH_BN, GN, LN, BRN, ONLINE_NORM, MABN, FN, *FN_ALIASES, BNP, SYNC_BN):
    register_method(_method)

__all__ = [
    "METHODS",
    "Method",
    "TrainingHook",
    "convert",
    "get_method",
    "group_count",
    "list_methods",
    "register_method",
    "resolve_method",
]
