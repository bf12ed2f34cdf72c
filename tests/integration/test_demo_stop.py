"""A stop during `tristage demo` ends it with one line before the next stage starts: exit 0 after SIGTERM,
130 after Ctrl-C (SIGINT, issue 40 item 1)."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from ..conftest import tristage, user_folder


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_a_stop_in_stage1_stops_the_demo_there(tmp_path, sig, status):
    out = tmp_path / "demo"
    demo = subprocess.Popen(
        tristage("demo", "--fast", "--out", str(out)),
        cwd=user_folder(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 300
        while not (out / "stage1" / "config.yaml").exists():  # written as stage 1 starts (cache, then train)
            assert demo.poll() is None and time.time() < deadline, "the demo never reached stage 1"
            time.sleep(0.05)
        demo.send_signal(sig)
        stdout, stderr = demo.communicate(timeout=300)
    finally:
        demo.kill()
    assert demo.returncode == status, stderr[-3000:]
    assert "Traceback" not in stderr
    assert stdout.strip().splitlines()[-1] == "stopped during stage 1; rerun to continue"
    assert not (out / "stage2").exists() and not (out / "cache" / "stage2").exists()
    assert not (out / "report.json").exists()
