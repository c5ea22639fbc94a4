"""The fused kernels' build lock: a killed build's stale lock is cleared, a live one waited for."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import time

import pytest

from normlab.functional._fused import _loader

fcntl = pytest.importorskip("fcntl")


def test_stale_lock_of_a_killed_build_is_removed(tmp_path, caplog):
    folder = tmp_path / "normlab_fused_x"
    folder.mkdir()
    (folder / "lock").write_text("")  # what torch leaves behind when its build is killed
    (folder / "keep.txt").write_text("mine")
    with caplog.at_level(logging.WARNING, logger="normlab.functional._fused"):
        with _loader._exclusive_build(str(folder)):
            assert not (folder / "lock").exists()
    assert (folder / "keep.txt").read_text() == "mine"  # nothing else touched
    assert any("stale build lock" in r.getMessage() for r in caplog.records)


def test_a_live_build_is_waited_for_not_broken(tmp_path, caplog):
    folder = tmp_path / "normlab_fused_y"
    folder.mkdir()
    ready = tmp_path / "ready"
    script = textwrap.dedent(
        f"""
        import fcntl, os, time
        h = open({str(folder) + ".normlab-build"!r}, "a+b")
        fcntl.flock(h.fileno(), fcntl.LOCK_EX)
        open({str(folder / "lock")!r}, "w").close()      # torch's lock of a live build
        open({str(ready)!r}, "w").close()
        time.sleep(1.0)
        os.remove({str(folder / "lock")!r})              # the build finishes and cleans up
        fcntl.flock(h.fileno(), fcntl.LOCK_UN)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert time.monotonic() < deadline, "helper process did not start"
            time.sleep(0.02)
        with caplog.at_level(logging.WARNING, logger="normlab.functional._fused"):
            with _loader._exclusive_build(str(folder)):
                assert proc.poll() is not None or not (folder / "lock").exists()
                assert not (folder / "lock").exists()
        assert not any("stale build lock" in r.getMessage() for r in caplog.records)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == 0
