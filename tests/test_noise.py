"""The Philox noise stream shared by every backend: known answers, cross-backend identity (the Triton stream, the
in-kernel noise of every kernel backend, the C++ AVX2 path), memory order, statistics."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from scipy import stats

from backends import skip_unless_usable
from genfast._backend import implementation
from genfast.reference.random import noise_like, philox4x32, philox_normal
from tolerances import NOISE_ATOL

# high bits set in both words of key and offset, and a negative int64
SEED = torch.tensor([0x7EDC_BA98_7654_3210, -0x1234_5678_9ABC_DEF1], dtype=torch.int64)

# Random123's known-answer vectors for Philox-4x32-10: (counter, key) -> output
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter, key, expected", PHILOX_KAT)
def test_philox_known_answers(counter, key, expected):
    words = philox4x32(*(torch.tensor([c], dtype=torch.int64) for c in counter), *key)
    assert tuple(int(w) for w in words) == expected


@pytest.mark.parametrize("batch, sample_numel", [(1, 1), (3, 37), (2, 1030)])
def test_triton_stream_equals_reference(batch, sample_numel):
    from genfast.kernels.random import philox_normal as triton_philox_normal

    seed = torch.tensor([0x123456789ABCDEF, 0x7EDCBA987654321], dtype=torch.int64)
    torch.testing.assert_close(triton_philox_normal(seed, batch, sample_numel),
                               philox_normal(seed, batch, sample_numel), atol=NOISE_ATOL, rtol=0)


def test_noise_is_standard_normal():
    noise = philox_normal(torch.tensor([42, 0]), 4, 50_000).flatten().double()
    n = noise.numel()
    assert abs(noise.mean().item()) < 5 / n**0.5
    assert abs(noise.var().item() - 1.0) < 5 * (2 / n) ** 0.5
    assert stats.kstest(noise.numpy(), "norm").pvalue > 1e-3
    # fourth moment (kurtosis 3) checks the tails of the Box-Muller transform
    assert abs((noise**4).mean().item() - 3.0) < 0.1


def test_no_correlation_between_calls_samples_and_lanes():
    a = philox_normal(torch.tensor([1, 0]), 2, 40_000).double()
    b = philox_normal(torch.tensor([2, 0]), 2, 40_000).double()  # a different seed: the next call's stream
    c = philox_normal(torch.tensor([1, 1]), 2, 40_000).double()  # same key, another offset
    bound = 5 / 40_000**0.5
    for x, y in [(a[0], b[0]), (a[0], c[0]), (a[0], a[1])]:  # across calls, offsets and samples
        assert abs(torch.corrcoef(torch.stack([x, y]))[0, 1].item()) < bound
    lanes = a[0].view(-1, 4)  # the four normals of one Philox call
    corr = torch.corrcoef(lanes.T)
    assert (corr - torch.eye(4, dtype=corr.dtype)).abs().max().item() < bound


def test_noise_follows_memory_layout():
    """The stream indexes memory positions: a channels_last tensor gets, per sample, the NHWC-ordered stream."""
    seed = torch.tensor([9, 9])
    x = torch.empty(2, 3, 4, 5).to(memory_format=torch.channels_last)
    noise = noise_like(x, seed)
    assert noise.stride() == x.stride()
    flat = philox_normal(seed, 2, 60)
    torch.testing.assert_close(noise.permute(0, 2, 3, 1).reshape(2, 60), flat)


def _in_kernel_noise(backend, x):
    """ε as a kernel backend draws it inside an op: z = 0 + exp(0)·ε of reparameterize_kl."""
    z, _ = implementation(backend, "reparameterize").reparameterize_kl(x, x, None, SEED, True, False)
    return z


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (2, 3, 7, 9), (2, 4101)])
def test_in_kernel_noise_is_the_reference_stream(kernel_backend, shape):
    """The same seed gives the reference's noise within NOISE_ATOL, in every kernel backend's ops."""
    zeros = torch.zeros(shape)
    torch.testing.assert_close(_in_kernel_noise(kernel_backend, zeros), noise_like(zeros, SEED), atol=NOISE_ATOL,
                               rtol=0)


def test_in_kernel_noise_follows_memory_order_of_channels_last(kernel_backend):
    x = torch.zeros(2, 3, 5, 7).contiguous(memory_format=torch.channels_last)
    z = _in_kernel_noise(kernel_backend, x)
    assert z.stride() == x.stride()
    torch.testing.assert_close(z, noise_like(x, SEED), atol=NOISE_ATOL, rtol=0)


_AVX2_NOISE_CHECK = textwrap.dedent("""
    import torch
    from genfast._backend import implementation
    from genfast.reference.random import noise_like
    assert torch.backends.cpu.get_cpu_capability() != "AVX512"
    seed = torch.tensor([0x7EDCBA9876543210, -0x123456789ABCDEF1])
    x = torch.zeros(3, 4101)
    z, _ = implementation("cpp", "reparameterize").reparameterize_kl(x, x, None, seed, True, False)
    print((z - noise_like(x, seed)).abs().max().item())
""")


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512",
                    reason="the CPU runs the AVX2 noise path in every other test")
def test_cpp_avx2_noise_path_is_the_reference_stream():
    """Where ATen uses AVX-512 the C++ noise runs a 16-lane twin; the at::vec path runs under
    ATEN_CPU_CAPABILITY=avx2."""
    skip_unless_usable("cpp", op="reparameterize")
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2")
    result = subprocess.run([sys.executable, "-c", _AVX2_NOISE_CHECK], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout.strip().splitlines()[-1]) <= NOISE_ATOL
