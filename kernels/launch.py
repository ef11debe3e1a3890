"""What the Triton kernel modules share: dtype names, TF32 choice, the device guard, the
interpreter's bf16 upcast and its dot, and the ahead-of-time signature that tests/test_triton_compile.py
compiles.

Imported as `dive.kernels.launch` (absolute): the compile test loads each kernel file on its own,
with that name bound to the launch.py beside the file.
"""
import torch
import triton
import triton.language as tl

from dive.ops._native_args import DTYPE_NAME as TL_DTYPE  # torch dtype -> "fp32", "fp16", "bf16"


def next_pow2(v: int) -> int:
    return 1 << (v - 1).bit_length()


def precision(dtype):
    """`tl.dot` input precision for fp32 inputs, following torch's TF32 switch."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def device_guard(t):
    """Launch on t's card (a no-op context for CPU tensors under the interpreter)."""
    return torch.cuda.device(t.device.index if t.is_cuda else -1)


def interpreter_upcast(t) -> bool:
    # CPU tensors only run under the interpreter, whose bfloat16 dot is wrong.
    return t.dtype == torch.bfloat16 and not t.is_cuda


def aot_signature(fn, consts, pointers, floats, aligned):
    """(signature, attrs) of `fn` for triton.compile: constexprs, typed pointers, fp32 scalars,
    i32 for the rest; pointers and `aligned` integers are declared divisible by 16."""
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = "*" + pointers[name]
        elif name in floats:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
        if name in pointers or name in aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, attrs


@triton.jit
def dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # The CPU interpreter multiplies raw bfloat16 bit patterns (triton-lang/triton#11584).
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)
