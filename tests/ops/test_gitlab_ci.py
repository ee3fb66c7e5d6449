""".gitlab-ci.yml: valid against GitLab's schema, with test, build and deploy
stages, and a test stage that runs exactly the README's test command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml
from ops_helpers import ROOT, tool

CI_FILE = ROOT / ".gitlab-ci.yml"


def check_jsonschema() -> str:
    beside_python = Path(sys.executable).parent / "check-jsonschema"
    return str(beside_python) if beside_python.exists() else tool("check-jsonschema")


def test_the_pipeline_is_valid_against_gitlabs_schema() -> None:
    checked = subprocess.run(
        [check_jsonschema(), "--builtin-schema", "vendor.gitlab-ci", str(CI_FILE)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_pipeline_has_its_stages_and_tests_with_the_readme_command() -> None:
    pipeline = yaml.safe_load(CI_FILE.read_text())
    assert pipeline["stages"] == ["test", "build", "deploy"]
    jobs = {name: job for name, job in pipeline.items() if isinstance(job, dict) and "stage" in job}
    assert {job["stage"] for job in jobs.values()} == {"test", "build", "deploy"}
    readme = (ROOT / "README.md").read_text()
    ci_run = (ROOT / ".ci" / "run").read_text()
    assert "\n    scripts/test\n" in readme and "\nscripts/test\n" in ci_run
    [test_job] = [job for job in jobs.values() if job["stage"] == "test"]
    assert test_job["script"] == ["scripts/test"]
    [build_job] = [job for job in jobs.values() if job["stage"] == "build"]
    assert any("docker build" in line for line in build_job["script"])
    [deploy_job] = [job for job in jobs.values() if job["stage"] == "deploy"]
    assert any("compose" in line and " up " in line for line in deploy_job["script"])
