"""The interpreter's version check: Triton <= 3.6 beside numpy >= 2.4 is refused with the versions and the fix."""

import numpy
import pytest
import triton

from mrgfast.ops.backends.triton.common import check_interpreter, interpreter_conflict


@pytest.mark.parametrize("triton_version, numpy_version", [("3.6.0", "2.4.6"), ("3.2.0", "2.5.5"),
                                                           ("3.6.1", "2.4.0rc1")])
def test_old_triton_beside_new_numpy_is_named_with_the_fix(triton_version, numpy_version):
    conflict = interpreter_conflict(triton_version, numpy_version)
    assert f"Triton {triton_version}" in conflict and f"numpy {numpy_version}" in conflict
    assert "numpy<2.4 or triton>=3.7" in conflict


@pytest.mark.parametrize("triton_version, numpy_version", [("3.6.0", "2.3.5"), ("3.7.0", "2.4.6"),
                                                           ("3.9.0", "2.5.5"), ("4.0.0", "3.0.0")])
def test_versions_that_work_together_pass(triton_version, numpy_version):
    assert interpreter_conflict(triton_version, numpy_version) is None


def test_the_installed_pair_is_checked(monkeypatch):
    """check_interpreter reads the installed versions: this test run's pair passes (the interpreter tests ran)."""
    check_interpreter.cache_clear()
    monkeypatch.setattr(numpy, "__version__", "2.4.6")
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    with pytest.raises(RuntimeError, match="cannot run beside numpy 2.4.6"):
        check_interpreter()
    check_interpreter.cache_clear()
    monkeypatch.undo()
    check_interpreter()
