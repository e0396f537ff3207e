"""Errors that used to escape the one-line form: near-miss keys, unwritable workdirs, model
config errors."""

from __future__ import annotations

from atpo_jax import settings
from atpo_jax.cli import unknown_override_message
from atpo_jax.models import config as model_config
from tests.train import runs


def test_a_near_miss_key_names_the_setting_meant():
    # What ml_collections raises for --config.train.stepz (a KeyError whose text is quoted twice).
    error = KeyError('\'stepz\'\nDid you mean "steps" instead of "stepz"?')
    argv = ["launch", "--config=configs/search_qa.py", "--config.train.stepz=3"]
    assert unknown_override_message(error, argv) == (
        "--config.train.stepz names no setting ('stepz' does not exist there): "
        "did you mean --config.train.steps?"
    )
    # A section typo, from an AttributeError.
    error = AttributeError('\'trian\'\nDid you mean "train" instead of "trian"?')
    argv = ["launch", "--config.trian.steps=3"]
    assert unknown_override_message(error, argv).endswith("did you mean --config.train.steps?")
    # Nothing close: where the settings are listed.
    message = unknown_override_message(KeyError("'qqq'"), ["launch", "--config.train.qqq=1"])
    assert message.startswith("--config.train.qqq names no setting ('qqq' does not exist there);")
    assert "configs/search_qa.py" in message


def test_a_models_config_error_is_a_configuration_error():
    assert issubclass(model_config.ConfigError, settings.ConfigError)


def test_unwritable_workdir_and_near_miss_key_through_the_launcher(child_env, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    out = runs.run_module(
        "atpo_jax.launch", [f"--config={runs.CONFIG_FILE}", f"--workdir={blocker}/run"], child_env
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        f"configuration error: cannot create --workdir={blocker}/run: Not a directory"
    )
    assert "Traceback" not in out.stderr
    out = runs.run_module(
        "atpo_jax.launch", [f"--config={runs.CONFIG_FILE}", "--config.train.stepz=3"], child_env
    )
    assert out.returncode == 2
    assert "did you mean --config.train.steps?" in out.stderr and "Traceback" not in out.stderr


def test_fail_prints_one_line_flushes_and_exits_with_the_code():
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from atpo_jax.cli import fail\n"
        "print('buffered output before the error', end='')\n"
        "fail('checkpoint error', ValueError('step 4 cannot be read'))\n"
        "print('not reached')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert done.stdout == "buffered output before the error"
    assert done.stderr.strip().splitlines() == ["checkpoint error: step 4 cannot be read"]


def test_quiet_closed_event_loop_drops_only_that_noise(monkeypatch):
    import sys
    import types

    from atpo_jax.cli import quiet_closed_event_loop

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(str(u.exc_value)))
    quiet_closed_event_loop()
    quiet_closed_event_loop()  # a second install adds nothing
    noise = types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"))
    other = types.SimpleNamespace(exc_value=RuntimeError("something else"))
    sys.unraisablehook(noise)
    sys.unraisablehook(other)
    sys.unraisablehook(types.SimpleNamespace(exc_value=ValueError("Event loop is closed")))
    assert seen == ["something else", "Event loop is closed"]
