"""The regularizers' random draws (docs/semantics.md section 10, rnntl_fast/ops/draws.py):
Philox-4x32-10 against its published known-answer vectors, the native CPU op
`rnntl_fast::bernoulli_draws_` bit for bit against the torch-op form at every thread count,
the distribution, the generator's part, and the op's argument checks."""
import pytest
import torch

from rnntl_fast import _ext
from rnntl_fast.ops.draws import bernoulli_draws, draw_seed, philox4x32_10, philox_draws
from parity import threads

pytestmark = pytest.mark.skipif(not _ext.HAS_CPU_KERNELS, reason="rnntl_fast._C is not built")

# (counter words, key words) -> output words, from the Random123 distribution's kat_vectors.
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]
DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}


def _native(shape, probability, value, seed, dtype=torch.float32):
    out = torch.empty(shape, dtype=dtype)
    torch.ops.rnntl_fast.bernoulli_draws_(out, probability, value, seed)
    return out


@pytest.mark.parametrize("counter,key,expected", KNOWN_ANSWERS, ids=["zeros", "ones", "pi"])
def test_philox_words_match_the_published_known_answers(counter, key, expected):
    words = philox4x32_10(*(torch.tensor(w, dtype=torch.int64) for w in counter + key))
    assert words.tolist() == list(expected)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", [(1,), (3,), (4,), (5,), (7, 11), (2, 3, 4099)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("probability,value", [(0.1, 1.0), (0.5, 2.0), (0.75, 1 / 0.75), (0.0, 1.0), (1.0, 1.0)],
                         ids=["p0.1", "p0.5-v2", "p0.75-dropout", "p0", "p1"])
def test_native_op_equals_the_torch_op_form_bit_for_bit(shape, dtype, probability, value):
    seed = torch.tensor(0x1234_5678_9ABC_DEF0 >> 1)
    native = _native(shape, probability, value, seed, dtype)
    assert torch.equal(native, philox_draws(shape, probability, value, seed, dtype, "cpu"))
    if probability == 0.0:
        assert not native.any()
    if probability == 1.0:
        assert bool((native == value).all())


def test_draws_do_not_depend_on_the_thread_count():
    seed = torch.tensor(987654321987)
    shape = (3, 4096 * 4 + 13, 5)  # several parallel chunks, a ragged end
    results = []
    for count in (1, 2, 3):
        with threads(count):
            results.append(_native(shape, 0.3, 1.0, seed))
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


@pytest.mark.parametrize("probability", [0.05, 0.5, 0.9])
def test_draws_have_the_asked_frequency_and_no_neighbour_correlation(probability):
    n = 1_000_000
    draws = _native((n,), probability, 1.0, draw_seed("cpu")).double()
    standard_error = (probability * (1 - probability) / n) ** 0.5
    assert abs(draws.mean().item() - probability) < 5 * standard_error
    # entries of one Philox block (i, i+1) and of neighbouring blocks (i, i+4) are uncorrelated
    for lag in (1, 4):
        centred = draws - draws.mean()
        correlation = (centred[:-lag] * centred[lag:]).mean() / centred.var()
        assert abs(correlation.item()) < 5 / n ** 0.5


def test_seeds_come_from_the_default_generator():
    like = torch.empty(0)
    torch.manual_seed(5)
    first, second = bernoulli_draws((64, 33), 0.5, 1.0, like), bernoulli_draws((64, 33), 0.5, 1.0, like)
    torch.manual_seed(5)
    again = bernoulli_draws((64, 33), 0.5, 1.0, like)
    assert torch.equal(first, again) and not torch.equal(first, second)


def test_bernoulli_draws_rejects_a_probability_outside_0_1():
    with pytest.raises(ValueError, match="probability"):
        bernoulli_draws((3,), 1.5, 1.0, torch.empty(0))


@pytest.mark.parametrize("case,match", [
    ("non_contiguous", "out must be contiguous"),
    ("integer", "out must be a floating-point tensor"),
    ("probability", "probability must be in \\[0, 1\\]"),
    ("seed_dtype", "seed must be a one-element int64 CPU tensor"),
    ("seed_size", "seed must be a one-element int64 CPU tensor"),
])
def test_native_op_rejects_bad_arguments_by_name(case, match):
    out, probability, seed = torch.empty(4, 6), 0.5, torch.tensor(3)
    if case == "non_contiguous":
        out = out.t()
    elif case == "integer":
        out = torch.empty(4, dtype=torch.int32)
    elif case == "probability":
        probability = -0.25
    elif case == "seed_dtype":
        seed = torch.tensor(3.0)
    elif case == "seed_size":
        seed = torch.tensor([1, 2])
    with pytest.raises(RuntimeError, match=match):
        torch.ops.rnntl_fast.bernoulli_draws_(out, probability, 1.0, seed)


def test_opcheck():
    torch.library.opcheck(torch.ops.rnntl_fast.bernoulli_draws_.default,
                          (torch.empty(5, 7), 0.25, 4.0, torch.tensor(11)))
