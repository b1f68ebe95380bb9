"""Errors name parameters, and each caller shows them by its own names (`data_store.errors`).

A library caller reads the Python spelling (``overwrite=True``); the `tsesnet` command shows
the same error by its flags (``--overwrite``), the line otherwise unchanged.
"""

from __future__ import annotations

import pickle

import pytest

from data_store.errors import InputError, shown_as
from tsesnet.cli import main
from tsesnet.common import names

FLAGS = {"overwrite": "--overwrite", "wait": "--wait", "trials": "--trials"}


def test_placeholders_in_python_spelling_or_by_the_names_given():
    err = InputError(
        "pass {wait=SECONDS} to wait longer, {overwrite=True} to replace it; leave {trials} out",
        path="/data/out",
        params=["wait", "overwrite", "trials"],
    )
    assert str(err) == (
        "/data/out: pass wait=SECONDS to wait longer, overwrite=True to replace it; "
        "leave trials out"
    )
    assert err.problem == str(err).removeprefix("/data/out: ")
    assert err.naming(FLAGS) == (
        "/data/out: pass --wait SECONDS to wait longer, --overwrite to replace it; "
        "leave --trials out"
    )
    # a parameter the mapping lacks keeps the Python spelling
    assert err.naming({"wait": "--wait"}).endswith("overwrite=True to replace it; leave trials out")


def test_only_declared_parameters_are_placeholders():
    """Braces of a path or JSON stay as they are; nothing runs `str.format` on the text."""
    text = 'case {x}/{wait}: {"a": 1} {0} {overwrite=True} {trials:>3}'
    err = InputError(text, path="/p/{overwrite}", params=["overwrite"])
    assert str(err) == '/p/{overwrite}: case {x}/{wait}: {"a": 1} {0} overwrite=True {trials:>3}'
    assert err.naming(FLAGS) == (
        '/p/{overwrite}: case {x}/{wait}: {"a": 1} {0} --overwrite {trials:>3}'
    )


def test_param_goes_first_or_where_the_message_says_and_a_single_name_still_works():
    err = InputError("must be >= 0 seconds, got -1", param="wait")
    assert str(err) == "wait must be >= 0 seconds, got -1"
    assert err.naming("--wait") == err.naming(FLAGS) == "--wait must be >= 0 seconds, got -1"
    err = InputError("give a larger {param}, or leave {param} out", param="trials")
    assert err.naming(FLAGS) == "give a larger --trials, or leave --trials out"
    assert err.naming(None) == str(err) == "give a larger trials, or leave trials out"


def test_the_placeholders_survive_pickling_and_moving():
    """An error raised in a Ray task or actor comes back pickled; a reader re-raises it for
    another case."""
    err = InputError("pass {overwrite=True}", path="a", params=["overwrite"])
    back = pickle.loads(pickle.dumps(err))
    assert back.naming(FLAGS) == "a: pass --overwrite" and str(back) == "a: pass overwrite=True"
    moved = back.moved(case="c1", path="b")
    assert moved.naming(FLAGS) == "case c1: b: pass --overwrite"
    assert moved.problem == "pass overwrite=True"


def test_shown_as_names_what_the_caller_knows_by_other_names():
    with pytest.raises(InputError) as info, shown_as({"pred_dir": "--pred"}):
        raise InputError("{pred_dir} is empty", params=["pred_dir"])
    assert str(info.value) == "pred_dir is empty"
    assert info.value.naming(FLAGS) == "--pred is empty"
    # the names the command line passes come first
    assert info.value.naming({"pred_dir": "--p"}) == "--p is empty"


def test_a_name_checked_below_the_cli_names_the_parameter_or_the_config_key():
    with pytest.raises(InputError) as info:
        names.check("../x")
    assert str(info.value).startswith("name '../x' is not a valid name")
    assert info.value.naming(FLAGS | {"name": "--name"}).startswith("--name '../x' is not")
    with pytest.raises(InputError) as info:
        names.check("../x", "run.registered_model_name", param=False)
    assert info.value.param is None
    assert info.value.naming({"name": "--name"}).startswith("run.registered_model_name '../x'")


def test_the_command_line_shows_a_parameter_by_its_flag(tmp_path, capsys):
    status = main(["train", "--store", str(tmp_path / "none.zarr"), "--name", "../x"])
    assert status == 2
    assert capsys.readouterr().err.strip() == (
        "error: --name '../x' is not a valid name: use letters, digits, '-', '_' and '.' "
        "(not first), at most 128 characters"
    )


def test_evaluate_shows_the_library_parameters_by_its_flags(tmp_path, capsys):
    """`evaluate_dirs(pred_dir, labels_dir)` names its parameters; `tsesnet evaluate` says
    --pred and --labels (here two spellings of one folder pass the command's own check)."""
    folder = tmp_path / "masks"
    folder.mkdir()
    pred, labels = str(folder), str(tmp_path / "." / "masks")
    assert main(["evaluate", "--pred", pred, "--labels", labels]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: {pred}: --pred and --labels are the same folder"
