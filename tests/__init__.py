"""
llmgw's trial suite: each module tests the module of the same name.

Hypothesis runs here on machines shared with other work (CI, a developer's
laptop under load): its timing health checks and per-example deadlines
measure the machine, not the code, so they are off for every test.  What a
property asserts is unchanged.
"""

from hypothesis import HealthCheck, settings

settings.register_profile("llmgw", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("llmgw")
