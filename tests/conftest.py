"""Test-wide settings: deterministic hypothesis profile without deadlines (jit compiles are slow);
how the suite splits over pytest-xdist workers."""

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "atpo",
    max_examples=25,
    deadline=None,
    derandomize=True,
    # The `call` fixture only selects eager vs jit execution; it holds no state between examples.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.load_profile("atpo")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """How ``pytest -n N`` (the README's test command) splits the suite over its workers.

    The trainer tests (tests/train) share session fixtures that are expensive to build (a
    warm-started policy, a 4-step launcher run), so they are one work unit that runs on one worker
    and builds them once; every other test file is its own unit, so its module fixtures are built
    once too. xdist hands out the units with the most tests first, so the trainer unit (the longest)
    starts at once and the other worker works through the rest meanwhile.
    """
    from xdist.scheduler import LoadScopeScheduling

    class TrainerTestsTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "tests/train" if path.startswith("tests/train/") else path

    return TrainerTestsTogether(config, log)
