"""Pure tensor math: no modules, no buffers, no globals. Importable without the rest of normlab.

Re-exports the public names of its submodules (each submodule's ``__all__``).
"""

from normlab.functional import batch_norm, distributed, full_norm, mabn, online_norm, precondition
from normlab.functional.batch_norm import *  # noqa: F403
from normlab.functional.distributed import *  # noqa: F403
from normlab.functional.full_norm import *  # noqa: F403
from normlab.functional.mabn import *  # noqa: F403
from normlab.functional.online_norm import *  # noqa: F403
from normlab.functional.precondition import *  # noqa: F403

__all__ = [
    name
    for module in (distributed, full_norm, batch_norm, precondition, mabn, online_norm)
    for name in module.__all__
]
