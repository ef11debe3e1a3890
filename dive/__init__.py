"""dive: set-based cross-modal retrieval kernels (DivE, CVPR 2023)."""
__version__ = "0.1.0"

from . import ops  # noqa: E402
from ._native import build_info  # noqa: E402

__all__ = ["ops", "build_info", "__version__"]
