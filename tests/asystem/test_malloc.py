"""The malloc settings of trainer processes: what they are, and that glibc applies them."""

import json
import platform
import subprocess
import sys

import pytest

from asystem.malloc import TUNABLES, trainer_env

# A child allocates, frees and allocates again 64 MiB; it prints the minor page faults of
# the second allocation. glibc's defaults map fresh pages for it (about 16k faults); with
# the settings the heap keeps the freed memory and the second allocation faults nothing.
CHILD = """
import json, resource
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
a = bytearray(64 << 20); del a
before = faults(); b = bytearray(64 << 20); print(json.dumps(faults() - before))
"""


def test_the_settings_go_to_trainers_unless_the_environment_has_its_own():
    assert trainer_env({}) == {"GLIBC_TUNABLES": TUNABLES}
    assert trainer_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) == {}


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the settings are glibc's")
def test_glibc_keeps_freed_memory_for_the_next_allocation_with_the_settings():
    def second_allocation_faults(env: dict) -> int:
        done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True,
                              timeout=60, check=True)
        return json.loads(done.stdout)

    assert second_allocation_faults({"GLIBC_TUNABLES": TUNABLES}) < 1000
    assert second_allocation_faults({}) > 10_000  # the default: fresh pages again
