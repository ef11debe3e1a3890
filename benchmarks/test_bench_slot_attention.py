"""Slot cross-attention speed, forward+backward: each backend against the reference, same run.

Shape of the paper's aggregation block: B=128, H=4, K=4 slots, d=dv=512, N tokens (36 regions;
49 and 64 grid cells). The whole AggregationBlock (depth 4, shared weights) is timed on the fused
op against the same block on the reference op.
CPU: fp32. GPU (marked gpu): fp32 and bf16, every N.
"""
import pytest
import torch

from dive.nn import AggregationBlock
from dive.ops import available_backends, slot_attention

B, H, K, D = 128, 4, 4, 512
TOKENS = (36, 49, 64)


def inputs(n, dtype=torch.float32, device="cpu"):
    torch.manual_seed(0)
    make = lambda *shape: torch.randn(*shape, device=device, dtype=dtype).requires_grad_()  # noqa: E731
    return make(B, H, K, D), make(B, H, n, D), make(B, H, n, D)


def step(q, k, v, backend):
    def run():
        for t in (q, k, v):
            t.grad = None
        slot_attention(q, k, v, backend=backend).sum().backward()
    return run


def block_step(block, tokens):
    def run():
        block.zero_grad(set_to_none=True)
        block(tokens).sum().backward()
    return run


def _role(backend):
    return "ref" if backend == "torch" else "kernel"


@pytest.mark.parametrize("n", TOKENS)
@pytest.mark.parametrize("backend", available_backends("slot_attention", "cpu"))
def test_cpu_slot_attention(benchmark, record, backend, n):
    if backend == "triton":
        pytest.skip("the Triton interpreter is not a CPU backend worth timing")
    benchmark(step(*inputs(n), backend))
    record(f"cpu slot-attn N={n} fp32 fwd+bwd", f"slot_attention[{backend}]", _role(backend))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_cpu_aggregation_block(benchmark, record, backend):
    # A quarter of the batch: at B=128 one step takes seconds on two cores.
    torch.manual_seed(0)
    block = AggregationBlock(1024, 1024, num_slots=K, depth=4, heads=H, head_dim=D,
                             backend=backend)
    benchmark.pedantic(block_step(block, torch.randn(B // 4, 36, 1024)), warmup_rounds=1,
                       rounds=5)
    record(f"cpu AggregationBlock B={B // 4} N=36 fp32 step", f"block[{backend}]",
           _role(backend))


# ----------------------------------------------------------------------------- GPU

GPU_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _cuda_bench(benchmark, fn):
    def run():
        fn()
        torch.cuda.synchronize()
    benchmark.pedantic(run, warmup_rounds=3, rounds=20, iterations=5)


@pytest.mark.gpu
@pytest.mark.parametrize("n", TOKENS)
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_gpu_slot_attention(benchmark, record, memory, backend, dtype, n):
    if backend not in available_backends("slot_attention", "cuda"):
        pytest.skip(f"{backend} is not available here")
    q, k, v = inputs(n, GPU_DTYPES[dtype], "cuda")
    run = step(q, k, v, backend)
    _cuda_bench(benchmark, run)
    record(f"gpu slot-attn N={n} {dtype} fwd+bwd", f"slot_attention[{backend}]", _role(backend),
           extra_mb=memory.cuda_extra_mb(run))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_gpu_aggregation_block(benchmark, record, backend, dtype):
    torch.manual_seed(0)
    block = AggregationBlock(1024, 1024, num_slots=K, depth=4, heads=H, head_dim=D,
                             backend=backend).cuda()
    tokens = torch.randn(B, 36, 1024, device="cuda")

    def run():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            block_step(block, tokens)()

    _cuda_bench(benchmark, run)
    record(f"gpu AggregationBlock N=36 {dtype} step", f"block[{backend}]", _role(backend))
