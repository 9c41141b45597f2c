"""The suite's own rules: every test restores the global settings it changes (the autouse
fixture in tests/conftest.py fails the test that does not), and skips that `make test`
must not take go through helpers.skip_or_fail."""
import pathlib
import re

import torch

from helpers import global_state

ROOT = pathlib.Path(__file__).resolve().parent


def test_the_state_check_sees_each_setting_change():
    before = global_state()
    changes = [
        (lambda: torch.set_default_dtype(torch.float64), lambda: torch.set_default_dtype(torch.float32)),
        (lambda: torch.use_deterministic_algorithms(True), lambda: torch.use_deterministic_algorithms(False)),
        (lambda: setattr(torch.backends.cudnn, "allow_tf32", not torch.backends.cudnn.allow_tf32),
         lambda: setattr(torch.backends.cudnn, "allow_tf32", not torch.backends.cudnn.allow_tf32)),
        (lambda: torch.set_float32_matmul_precision("medium"), lambda: torch.set_float32_matmul_precision("highest")),
    ]
    for change, undo in changes:
        change()
        try:
            assert global_state() != before
        finally:
            undo()
        assert global_state() == before


def test_skips_that_make_test_must_not_take_go_through_skip_or_fail():
    """A test that needs the compiled extension, a compiler or the Triton compiler skips
    through helpers.skip_or_fail (which fails under CNNKERNELS_REQUIRE_EXTENSION=1, as make
    test sets), never through a bare pytest.skip or skipif on those conditions."""
    toolchain = re.compile(r"(pytest\.skip|skipif)\([^)]*(nvcc|g\+\+|extension_loaded|_C is not|compiler)", re.S)
    offenders = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py")
                 if p.name != "test_hygiene.py" and toolchain.search(p.read_text())]
    assert offenders == []
