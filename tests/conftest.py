"""Test-wide settings: deterministic hypothesis profile without deadlines (jit compiles are slow)."""

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
