"""Importing kfcn has no side effects."""

import subprocess
import sys


def test_import_prints_nothing_and_loads_no_tensorflow():
    code = (
        "import sys, kfcn; "
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""


def test_unknown_attribute():
    import kfcn

    try:
        kfcn.build_fcn4s  # noqa: B018
    except AttributeError as error:
        assert "build_fcn4s" in str(error)
    else:
        raise AssertionError("expected AttributeError")
