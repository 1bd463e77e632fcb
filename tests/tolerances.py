"""The correctness rule of docs/semantics.md section 7, in one place.

A result of dtype D is compared with the float64 reference; its error must be at most
2x the error that the baseline (torch.nn, or the reference loop, run in the same dtype D)
makes against the same float64 reference, plus a small slack for D, scaled by the largest
magnitude of the reference where that exceeds 1 (a fixed absolute slack would be less than
one float32 ulp for values above 8, where a change of summation order alone moves a result
by an ulp or two).

`baseline` may also be a list of baseline results: the rule then takes the largest of their
errors. The layer-normalised cells' tests pass the reference loop run on the inputs rounded to
float32 to nearest and on three other roundings of the same float64 draw (each entry rounded
down or up at random, so still within one float32 ulp of it): through a layer-normalised
recurrence a float32 run's error is one sample of a wide distribution (docs/semantics.md
section 7).
"""
import torch

# Slack per dtype, times max(1, largest |reference|), added to 2x the baseline's error.
SLACK = {
    torch.float64: 1e-12,
    torch.float32: 1e-6,
    torch.float16: 1e-3,
    torch.bfloat16: 1e-2,
}
ERROR_FACTOR = 2.0


def max_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    if value is None or reference is None:
        assert value is None and reference is None, "one side has a gradient, the other has none"
        return 0.0
    assert value.shape == reference.shape, f"shape {tuple(value.shape)} != reference {tuple(reference.shape)}"
    return (value.double() - reference.double()).abs().max().item() if value.numel() else 0.0


def assert_within_error_rule(name, fast, baseline, reference64, dtype):
    """fast: a result in `dtype`; baseline: one baseline result in `dtype`, or a list of them
    (the largest error counts); reference64: the float64 oracle."""
    fast_error = max_error(fast, reference64)
    baselines = baseline if isinstance(baseline, (list, tuple)) else [baseline]
    baseline_error = max(max_error(b, reference64) for b in baselines)
    magnitude = max(1.0, reference64.abs().max().item()) if reference64 is not None and reference64.numel() else 1.0
    slack = SLACK[dtype] * magnitude
    bound = ERROR_FACTOR * baseline_error + slack
    assert fast_error <= bound, (f"{name}: error {fast_error:.3e} vs float64 reference exceeds "
                                 f"{ERROR_FACTOR} x baseline error {baseline_error:.3e} + {slack:.1e}")
    assert torch.isfinite(fast).all(), f"{name}: non-finite values"
