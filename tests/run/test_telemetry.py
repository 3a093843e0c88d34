"""No phone-home: MLflow's usage telemetry is off in every kd process unless the user turns it on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# the variables by which MLflow itself decides it runs under CI or pytest (and then sends nothing):
# removed, so the test sees what a user's shell would
CI_MARKERS = ("PYTEST_CURRENT_TEST", "CI", "GITHUB_ACTIONS", "GITLAB_CI", "JENKINS_URL", "BUILDKITE", "TRAVIS",
              "CIRCLECI", "TF_BUILD", "TEAMCITY_VERSION", "BITBUCKET_BUILD_NUMBER", "CODEBUILD_BUILD_ARN")  # fmt: skip


def _user_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CI_MARKERS and k not in ("MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK")}
    return env | {"HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config")} | extra


def test_importing_kd_turns_telemetry_off_unless_the_user_said_otherwise(tmp_path):
    probe = "import kd, mlflow.telemetry.utils as t; print(t.is_telemetry_disabled())"
    off = subprocess.run([sys.executable, "-c", probe], env=_user_env(tmp_path), capture_output=True, text=True, check=True)
    assert off.stdout.strip() == "True"
    on = subprocess.run([sys.executable, "-c", probe], env=_user_env(tmp_path, MLFLOW_DISABLE_TELEMETRY="false"),
                        capture_output=True, text=True, check=True)  # fmt: skip
    assert on.stdout.strip() == "False"


def test_a_run_writes_no_telemetry_installation_id(run_py, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    done = subprocess.run(run_py("trainer=debug", "teacher.max_epochs=1"), cwd=tmp_path, env=_user_env(home),
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (home / ".config" / "mlflow" / "telemetry.json").exists()
    assert "MLFLOW_DISABLE_TELEMETRY=true" in done.stdout  # the printed `mlflow ui` command keeps it off too
