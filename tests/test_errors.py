"""The shared validators of errors.py: NumPy numbers count as numbers, bools and text do not,
and array-likes become NumPy arrays."""

import re

import numpy as np
import pytest
import torch

from pretrain_reuse.errors import (
    PretrainReuseError,
    as_array,
    check_file,
    check_int,
    check_positive,
    check_seed,
)


def test_numpy_numbers_pass_and_come_back_as_python_numbers():
    assert type(check_positive("eps", np.float32(0.5))) is float
    assert check_positive("eps", np.float32(0.5)) == 0.5
    assert type(check_int("k", np.int64(5), minimum=1)) is int
    assert type(check_seed("seed", np.uint32(7))) is int


@pytest.mark.parametrize("check, value", [
    (lambda v: check_positive("eps", v), "0.1"),
    (lambda v: check_positive("eps", v), True),
    (lambda v: check_int("k", v, minimum=1), 5.0),
    (lambda v: check_int("k", v, minimum=1), True),
    (lambda v: check_int("k", v, minimum=1), np.int64(0)),
    (lambda v: check_seed("seed", v), 1.0),
])
def test_text_bools_and_non_integers_are_refused_naming_the_parameter(check, value):
    with pytest.raises(PretrainReuseError, match=rf"^(eps|k|seed) must be .*, got {re.escape(repr(value))}$"):
        check(value)


def test_tensors_become_numpy_arrays_even_in_bfloat16_or_with_grad():
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3).requires_grad_()
    np.testing.assert_array_equal(as_array("x", t), np.arange(6).reshape(2, 3))
    b = as_array("x", t.detach().bfloat16())
    assert b.dtype == np.float32
    np.testing.assert_array_equal(b, np.arange(6).reshape(2, 3))


def test_ragged_nested_lists_are_one_line():
    with pytest.raises(PretrainReuseError, match="x is not a rectangular array"):
        as_array("x", [[1.0, 2.0], [3.0]])


@pytest.mark.parametrize("path", [None, 3, b"file"])
def test_a_file_argument_that_is_no_path_is_refused_naming_its_type(path):
    with pytest.raises(PretrainReuseError, match=rf"^units must be a file path .*got {type(path).__name__}"):
        check_file("units", path)
