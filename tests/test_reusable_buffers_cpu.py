"""The CPU kernels' large tensors come from blocks kept for reuse (csrc/cpu/reusable_buffers_cpu.h,
docs/cpu.md "Memory"): a block is never handed to two live tensors, reuse gives the same
results, the idle blocks stay within RNNTL_CPU_BUFFER_CACHE_MB and empty_cpu_cache frees
them, and torch's profiler still sees every allocation (the benchmark's peak memory)."""
import os
import subprocess
import sys

import pytest
import torch

import rnntl_fast
from rnntl_fast.ops import cpu_cache_bytes, empty_cpu_cache

pytestmark = pytest.mark.skipif(not hasattr(torch.ops.rnntl_fast, "lstm_forward"),
                                reason="the compiled extension is not built")

# Every saved buffer of these sizes is above the 256 KiB under which torch's allocator serves.
T, B, I, H = 40, 16, 32, 128


def training_step(module, x):
    x = x.detach().requires_grad_()
    output, _ = module(x)
    output.square().sum().backward()
    grads = [x.grad] + [p.grad.clone() for p in module.parameters()]
    module.zero_grad(set_to_none=True)
    return output.detach(), grads


@pytest.mark.parametrize("layer_norm", [False, True], ids=["plain", "layer_norm"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_reuse_gives_the_same_results_and_never_shares_a_live_block(cell, layer_norm):
    torch.manual_seed(0)
    module = getattr(rnntl_fast, cell.upper())(I, H, layer_norm=layer_norm)
    x1, x2 = torch.randn(T, B, I), torch.randn(T, B, I)
    empty_cpu_cache()
    first_output, first_grads = training_step(module, x1)  # fresh blocks
    assert cpu_cache_bytes() > 0, "the step's freed buffers were not kept"
    kept = first_output.clone()
    second_output, _ = training_step(module, x2)  # reused blocks, first_output still alive
    assert first_output.data_ptr() != second_output.data_ptr()
    torch.testing.assert_close(first_output, kept, rtol=0, atol=0)
    again_output, again_grads = training_step(module, x1)
    torch.testing.assert_close(again_output, first_output, rtol=0, atol=0)
    for again, first in zip(again_grads, first_grads):
        torch.testing.assert_close(again, first, rtol=0, atol=0)


def test_empty_cpu_cache_frees_the_idle_blocks():
    module = rnntl_fast.LSTM(I, H, layer_norm=True)
    training_step(module, torch.randn(T, B, I))
    idle = cpu_cache_bytes()
    assert idle > 0
    assert empty_cpu_cache() == idle
    assert cpu_cache_bytes() == 0


def test_profiler_sees_the_reused_blocks():
    from rnntl_fast.bench.timing import peak_memory_bytes
    module = rnntl_fast.LSTM(I, H, layer_norm=True)
    x = torch.randn(T, B, I)
    training_step(module, x)  # the blocks now come from the idle list
    reserve = T * B * 15 * H * 4  # the layer-normalised LSTM saves 15H floats a row
    peak = peak_memory_bytes(lambda: training_step(module, x), torch.device("cpu"))
    if peak is None:
        pytest.skip("torch's profiler gives no memory events here")
    assert peak >= reserve


def run_with_limit(value: str) -> subprocess.CompletedProcess:
    script = ("import torch, rnntl_fast\n"
              "from rnntl_fast.ops import cpu_cache_bytes\n"
              f"m = rnntl_fast.LSTM({I}, {H}, layer_norm=True)\n"
              "for _ in range(2):\n"
              f"    out, _ = m(torch.randn({T}, {B}, {I}, requires_grad=True)); out.sum().backward()\n"
              "print(cpu_cache_bytes())\n")
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "RNNTL_CPU_BUFFER_CACHE_MB": value})


@pytest.mark.parametrize("limit_mb", [0, 1])
def test_idle_blocks_stay_within_the_limit(limit_mb):
    result = run_with_limit(str(limit_mb))
    assert result.returncode == 0, result.stderr
    assert 0 <= int(result.stdout.split()[-1]) <= limit_mb << 20


def test_a_bad_limit_is_an_error_naming_the_variable():
    result = run_with_limit("lots")
    assert result.returncode != 0
    assert "RNNTL_CPU_BUFFER_CACHE_MB" in result.stderr and "lots" in result.stderr


def test_steps_in_concurrent_threads_match_the_same_steps_in_turn():
    """The idle list is shared by the whole process: steps running at once in two Python
    threads (torch releases the GIL inside the ops) give what they give one after the other."""
    import threading
    torch.manual_seed(1)
    modules = [rnntl_fast.LSTM(I, H, layer_norm=True), rnntl_fast.GRU(I, H)]
    inputs = [torch.randn(T, B, I), torch.randn(T, B, I)]
    expected = [training_step(m, x) for m, x in zip(modules, inputs)]
    results = [[None] * 4 for _ in modules]

    def run(index):
        for round in range(4):
            results[index][round] = training_step(modules[index], inputs[index])

    threads = [threading.Thread(target=run, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, (output, grads) in enumerate(expected):
        for got_output, got_grads in results[index]:
            torch.testing.assert_close(got_output, output, rtol=0, atol=0)
            for got, want in zip(got_grads, grads):
                torch.testing.assert_close(got, want, rtol=0, atol=0)
