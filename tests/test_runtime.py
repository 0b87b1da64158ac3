"""The CPU runtime choice made before torch starts (pipeline/core/runtime.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.core import runtime

ROOT = Path(__file__).resolve().parents[1]


def test_plan_preloads_tcmalloc_and_spins_on_an_idle_machine():
    changes = runtime.plan({}, tcmalloc="/usr/lib/libtcmalloc_minimal.so.4", busy_cores=0.1)
    assert changes["LD_PRELOAD"] == "/usr/lib/libtcmalloc_minimal.so.4"
    assert changes["OMP_WAIT_POLICY"] == "ACTIVE"
    assert int(changes["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 1 << 40


def test_plan_waits_passively_when_other_processes_use_the_cores():
    assert runtime.plan({}, tcmalloc=None, busy_cores=1.2) == {"OMP_WAIT_POLICY": "PASSIVE"}


def test_plan_keeps_what_the_user_set():
    env = {"OMP_WAIT_POLICY": "PASSIVE", "LD_PRELOAD": "/opt/libfoo.so", runtime.ENV_ALLOCATOR: "system"}
    assert runtime.plan(env, tcmalloc="/usr/lib/libtcmalloc_minimal.so.4", busy_cores=0.0) == {}
    # an existing preload is kept after tcmalloc; an already preloaded tcmalloc is not added twice
    changes = runtime.plan({"LD_PRELOAD": "/opt/libfoo.so", "OMP_WAIT_POLICY": "ACTIVE"}, tcmalloc="/t.so", busy_cores=0)
    assert changes["LD_PRELOAD"] == "/t.so:/opt/libfoo.so"
    assert runtime.plan({"LD_PRELOAD": "/t.so", "OMP_WAIT_POLICY": "ACTIVE"}, tcmalloc="/t.so", busy_cores=0) == {}


def test_find_tcmalloc_searches_the_given_folders(tmp_path):
    assert runtime.find_tcmalloc((str(tmp_path),)) is None
    (tmp_path / "libtcmalloc_minimal.so.4").write_bytes(b"")
    assert runtime.find_tcmalloc((str(tmp_path / "missing"), str(tmp_path))) == str(tmp_path / "libtcmalloc_minimal.so.4")


def test_other_busy_cores_is_a_share_of_the_machine():
    busy = runtime.other_busy_cores(0.05)
    assert 0.0 <= busy <= (os.cpu_count() or 1) + 1e-9


def test_facts_name_the_allocator_and_policy():
    f = runtime.facts({"LD_PRELOAD": "/usr/lib/libtcmalloc_minimal.so.4", "OMP_WAIT_POLICY": "ACTIVE",
                       runtime.ENV_MARK: json.dumps({"other_busy_cores": 0.03})})
    assert f == {"allocator": "tcmalloc", "omp_wait_policy": "ACTIVE", "other_busy_cores": 0.03}
    assert runtime.facts({})["allocator"] == "system"


SCRIPT = """
import json, os, sys
from pipeline.core.runtime import tune, facts
tune()
print(json.dumps({**facts(), "argv": sys.argv[1:], "torch_loaded": "torch" in sys.modules}))
"""


def _run(env_extra: dict[str, str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "LD_PRELOAD", runtime.ENV_MARK)}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", SCRIPT, "--flag", "x"], cwd=ROOT, env=env, capture_output=True,
                         text=True, check=True, timeout=60)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(runtime.find_tcmalloc() is None, reason="tcmalloc is not installed (libtcmalloc-minimal4)")
def test_tune_reexecutes_once_with_tcmalloc_and_keeps_the_arguments():
    got = _run({})
    assert got["allocator"] == "tcmalloc"
    assert got["argv"] == ["--flag", "x"]
    assert got["omp_wait_policy"] in ("ACTIVE", "PASSIVE") and "other_busy_cores" in got


def test_tune_respects_a_forced_system_allocator_and_policy():
    got = _run({runtime.ENV_ALLOCATOR: "system", "OMP_WAIT_POLICY": "PASSIVE"})
    assert got["allocator"] == "system" and got["omp_wait_policy"] == "PASSIVE"
    assert got["argv"] == ["--flag", "x"] and not got["torch_loaded"]
