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
        kfcn.build_fcn_no_such_variant  # noqa: B018
    except AttributeError as error:
        assert "build_fcn_no_such_variant" in str(error)
    else:
        raise AssertionError("expected AttributeError")


_LOAD = """
import sys
{first}
assert 'keras' not in sys.modules or {keras_first}
import keras
model = keras.saving.load_model(sys.argv[1], safe_mode=True)
print(model.get_layer('pad').__class__.__module__)
"""


def _saved_model(tmp_path_factory):
    import kfcn

    path = tmp_path_factory.mktemp("saved") / "m.keras"
    kfcn.build_fcn32s(backbone="mobilenetv2", num_classes=3, input_shape=(64, 64, 3)).save(path)
    return str(path)


def test_plain_import_kfcn_registers_classes_for_keras_load_model(tmp_path_factory):
    """`import kfcn` then `keras.saving.load_model`: the classes are found (issue 7.9)."""
    path = _saved_model(tmp_path_factory)
    for first, keras_first in (("import kfcn", "False"), ("import keras, kfcn", "True")):
        code = _LOAD.format(first=first, keras_first=keras_first)
        result = subprocess.run(
            [sys.executable, "-c", code, path], capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, (first, result.stderr[-2000:])
        assert result.stdout.strip().endswith("kfcn.layers"), result.stdout


_HELP_ALL = """
import contextlib, io, sys
from kfcn.cli import COMMANDS, main
for argv in [["--help"]] + [[name, "--help"] for name in COMMANDS]:
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as stop:
            code = stop.code
    assert code == 0, (argv, code)
loaded = [m for m in ("tensorflow", "keras") if m in sys.modules]
assert not loaded, loaded
"""


def test_command_help_does_not_import_tensorflow():
    result = subprocess.run([sys.executable, "-c", _HELP_ALL], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
