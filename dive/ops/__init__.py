"""Public ops. Models call these, never a backend directly."""
from .registry import available_backends
from .slot_attention import slot_attention, slot_attention_ref, slot_attention_weights
from .smooth_chamfer import smooth_chamfer, smooth_chamfer_ref

__all__ = ["available_backends", "slot_attention", "slot_attention_ref", "slot_attention_weights",
           "smooth_chamfer", "smooth_chamfer_ref"]
