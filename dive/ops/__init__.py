"""Public ops. Models call these, never a backend directly."""
from .registry import available_backends
from .smooth_chamfer import smooth_chamfer, smooth_chamfer_ref

__all__ = ["available_backends", "smooth_chamfer", "smooth_chamfer_ref"]
