"""Fixtures for the fake-process-group tests."""

import time

import pytest
import torch


def bf16_gemm_slowdown() -> float:
    """How many times slower a bf16 matrix product runs than an fp32 one on this CPU, one thread. CPUs without
    AVX-512 (AVX2 only) have no bf16 GEMM kernel in torch's CPU build: measured 30x to 150x slower."""

    def seconds(dtype: torch.dtype) -> float:
        a, b = torch.ones(256, 512, dtype=dtype), torch.ones(512, 512, dtype=dtype)
        a @ b
        start = time.perf_counter()
        for _ in range(3):
            a @ b
        return time.perf_counter() - start

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return seconds(torch.bfloat16) / seconds(torch.float32)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def bf16_compute() -> None:
    """Skip memory measurements of real bf16 runs at sizes where compute counts (preset `small`, 7B shapes):
    where bf16 GEMM is emulated they take 20 minutes and more each, so they run where bf16 products are
    within 10x of fp32 (AVX-512 and newer) and are reported skipped, with the measured slowdown, elsewhere.
    A fixture, so the 0.3 s probe runs once per session and never in the spawned workers."""
    slowdown = bf16_gemm_slowdown()
    if slowdown > 10:
        pytest.skip(f"this CPU has no native bf16 GEMM (bf16 products {slowdown:.0f}x slower than fp32): these real "
                    "bf16 runs would take over 20 minutes")
