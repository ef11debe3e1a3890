"""What the ops hand to their native and Triton backends: the dtype table, masks as bytes, raw
pointers, and whether a backend can run on a device."""
import torch

from .. import _native

# Every dtype a fused backend takes: its short name (dispatch keys, Triton signatures) and its
# code in the native raw-pointer API (csrc/bindings_*.cpp switch on it).
DTYPES = {torch.float32: ("fp32", 0), torch.float16: ("fp16", 1), torch.bfloat16: ("bf16", 2)}
DTYPE_NAME = {dtype: name for dtype, (name, _) in DTYPES.items()}
DTYPE_CODE = {dtype: code for dtype, (_, code) in DTYPES.items()}


def u8(mask):
    """A bool mask as contiguous bytes (None stays None). Hold the result in a local until the
    native call returns: a copy would otherwise be freed under it."""
    return None if mask is None else mask.contiguous().view(torch.uint8)


def ptr(t):
    """The data pointer of `t`, 0 for None (the native API's "no mask")."""
    return 0 if t is None else t.data_ptr()


def needs(module_name, device_type):
    """An `unavailable(device)` for a backend in dive.<module_name> ("_C" or "_C_cuda")."""
    def unavailable(device):
        if device.type != device_type:
            return f"it runs on {device_type} tensors only"
        loader = _native.cpu_module if module_name == "_C" else _native.cuda_module
        if loader() is None:
            return f"dive.{module_name} was not built (see dive.build_info())"
        return None
    return unavailable


def triton_unavailable(device):
    if _native.triton_version() is None:
        return "triton is not installed"
    if device.type == "cuda" or (device.type == "cpu" and _native.triton_interpreted()):
        return None
    return "it needs CUDA tensors (or CPU tensors under TRITON_INTERPRET=1)"
