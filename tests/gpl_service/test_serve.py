"""`gpl serve`: teaches in --help, fails in one line on bad input, and answers over real HTTP."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from gpl_service.cli import app
from gpl_service.process import free_port, wait_ready
from tests.gpl_service.conftest import PROJECT, Served

runner = CliRunner()


def test_help_teaches_the_api() -> None:
    result = runner.invoke(app, ["serve", "--help"])
    assert result.exit_code == 0
    for text in ("/v1/prerank", "/v1/admin/reload", "GPL_SERVE_ADMIN_TOKEN", "GPL_REDIS_URL"):
        assert text in result.output


def test_bad_run_dir_or_bundle_is_one_line_and_exit_2(served: Served, tmp_path: Path) -> None:
    result = runner.invoke(app, ["serve", "--run-dir", str(tmp_path / "none")])
    assert result.exit_code == 2
    assert "no run directory" in result.output and "Traceback" not in result.output
    result = runner.invoke(
        app,
        ["serve", "--run-dir", str(served.root), "--bundle", str(tmp_path / "nobundle")],
        env={"GPL_PROJECT": PROJECT},
    )
    assert result.exit_code == 2
    assert "no bundle directory" in result.output and "gpl export" in result.output


@pytest.mark.parametrize("workers", [1, 2])
def test_serves_over_http_until_stopped(served: Served, workers: int) -> None:
    port = free_port()
    cmd = [
        sys.executable, "-m", "gpl_service.cli", "serve", "--run-dir", str(served.root),
        "--port", str(port), "--as-of", served.as_of.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "--log-level", "warning", "--workers", str(workers),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, env={**os.environ, "GPL_PROJECT": PROJECT})
    url = f"http://127.0.0.1:{port}"
    try:
        # Generous: two workers each load the bundle and the stores; on a 2-core box busy with
        # other jobs that took over 60 s once. The bound only matters when start-up hangs.
        wait_ready(proc, f"{url}/v1/ready", timeout=180)
        body = {"user_id": served.users[0], "candidates": served.items[:20], "top_k": 3}
        answers = [httpx.post(f"{url}/v1/prerank", json=body, timeout=10) for _ in range(4)]
        assert all(a.status_code == 200 for a in answers)
        got = answers[0]
        assert all(a.json()["items"] == got.json()["items"] for a in answers)
        assert [i["model"] for i in got.json()["items"]] == ["expressive"] * 3
        assert got.json()["stats"]["history_items"] > 0  # --as-of keeps the rows in ttl
        assert httpx.get(f"{url}/docs", timeout=10).status_code == 200
        assert httpx.get(f"{url}/openapi.json", timeout=10).json()["info"]["title"]
    finally:
        proc.terminate()
        # uvicorn shuts down gracefully (lifespan stops the watcher), then re-raises SIGTERM
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)


def test_gpl_serve_settings_come_from_the_environment(served: Served) -> None:
    """GPL_SERVE_RUN_DIR / _PORT / _LOG_LEVEL / _AS_OF without any flag: the service binds that
    port and serves that run; a log level uvicorn lacks is one line, exit 2."""
    result = runner.invoke(app, ["serve", "--log-level", "verbose"])
    assert result.exit_code == 2 and "verbose" in result.output
    assert "Traceback" not in result.output
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "GPL_RUN_DIR"}
    env.update(
        GPL_PROJECT=PROJECT,
        GPL_SERVE_RUN_DIR=str(served.root),
        GPL_SERVE_PORT=str(port),
        GPL_SERVE_LOG_LEVEL="warning",
        GPL_SERVE_AS_OF=served.as_of.isoformat(),
    )
    proc = subprocess.Popen([sys.executable, "-m", "gpl_service.cli", "serve"], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, f"{url}/v1/ready", timeout=180)
        body = {"user_id": served.users[0], "candidates": served.items[:5], "top_k": 2}
        got = httpx.post(f"{url}/v1/prerank", json=body, timeout=10)
        assert got.status_code == 200 and got.json()["stats"]["history_items"] > 0
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
