"""Every Triton kernel has an ahead-of-time compile spec whose signature names real arguments."""

from mrgfast.ops.backends.triton.aot import collect_specs, constexpr_names


def test_every_kernel_is_covered_by_a_spec():
    specs, uncovered = collect_specs()
    assert specs, "no AOT specs found"
    assert uncovered == [], f"kernels without AOT specs: {uncovered}"


def test_spec_signatures_cover_each_argument_once():
    for spec in collect_specs()[0]:
        signature = spec.signature()
        assert list(signature) == list(spec.kernel.arg_names)
        unknown = (set(spec.pointers) | set(spec.constexprs)) - set(spec.kernel.arg_names)
        assert not unknown, f"{spec.kernel.fn.__name__} {spec.variant}: unknown arguments {unknown}"
        declared = constexpr_names(spec.kernel)
        assert declared, f"{spec.kernel.fn.__name__}: no constexpr parameters found"
        assert set(spec.constexprs) == declared, f"{spec.kernel.fn.__name__} {spec.variant}: constexprs differ"
