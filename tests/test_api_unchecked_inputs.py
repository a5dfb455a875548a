"""Kernels given offsets and kinds nobody checked stay in bounds, write every output and follow their documented
rule (tests/support/unchecked_cases.py), run in a child process so that an out-of-bounds access fails this test."""

from support.isolated import run_pytest_isolated


def test_unchecked_offsets_and_kinds_in_a_child_process():
    run_pytest_isolated("support/unchecked_cases.py")
