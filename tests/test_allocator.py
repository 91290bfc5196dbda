"""qbco.cli.allocator: the qbco command restarts itself once under mimalloc (LD_PRELOAD), keeps a user's choices,
and never replaces a process that only calls the CLI in-process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qbco.cli.allocator import ENV, mimalloc_library, restart_environment

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or mimalloc_library() is None,
                                reason="mimalloc is a dependency on x86-64 Linux only")

CHILD = (
    "from qbco.cli.allocator import restart_under_mimalloc, active\nrestart_under_mimalloc()\nimport os\n"
    "print(active(), os.getpid(), os.environ.get('MIMALLOC_PURGE_DELAY'))\n"
)


def test_the_environment_preloads_mimalloc_and_keeps_what_the_user_set():
    env = restart_environment({"PATH": "/bin"})
    first = env["LD_PRELOAD"].split(":")[0]
    assert Path(first).is_file() and "libmimalloc.so" in Path(first).name
    assert env[ENV] == "mimalloc" and env["MIMALLOC_PURGE_DELAY"] == "-1" and env["PATH"] == "/bin"
    mine = restart_environment({"LD_PRELOAD": "/opt/libmine.so", "MIMALLOC_PURGE_DELAY": "100"})
    assert mine["LD_PRELOAD"].split(":")[1:] == ["/opt/libmine.so"] and mine["MIMALLOC_PURGE_DELAY"] == "100"
    assert restart_environment({ENV: "system"}) is None  # the user's opt-out, and the mark of a restarted process
    assert restart_environment({ENV: "mimalloc"}) is None


def run_as(tmp_path, name, env_extra=None):
    script = tmp_path / name
    script.write_text(CHILD)
    env = {k: v for k, v in os.environ.items() if k not in (ENV, "LD_PRELOAD", "MIMALLOC_PURGE_DELAY")}
    env.update(env_extra or {})
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    allocator, pid, delay = out.split()
    return allocator, int(pid), delay, proc.pid


def test_the_qbco_command_restarts_in_place_under_mimalloc(tmp_path):
    allocator, pid, delay, launched = run_as(tmp_path, "qbco")
    assert (allocator, delay) == ("mimalloc", "-1")
    assert pid == launched  # execve: the same process, so a Ctrl-C still reaches it


def test_no_restart_when_opted_out_or_not_the_qbco_command(tmp_path):
    assert run_as(tmp_path, "qbco", {ENV: "system"})[0] == "system"
    assert run_as(tmp_path, "pytest")[0] == "system"
