"""terraform/ checked offline (issue 26): formatted, initialised from a local provider
directory (no registry), valid (the root and each example), `terraform test` passing against a
mocked AWS provider, and checkov clean but for the justified skips in terraform/.checkov.yaml.
Each check skips, saying how to get what it needs, where terraform, the provider or checkov is
missing."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TERRAFORM = REPO / "terraform"
# Where the AWS provider lies for `terraform init -plugin-dir` (the registry is not reached).
PLUGINS = Path(os.environ.get("KILN_TF_PLUGIN_DIR", "/opt/tf-plugins"))
ROOTS = [".", "examples/minimal", "examples/complete"]


def _terraform() -> str:
    found = shutil.which("terraform")
    if found is None:
        pytest.skip("terraform is not installed: https://developer.hashicorp.com/terraform/install")
    if not (PLUGINS / "registry.terraform.io" / "hashicorp" / "aws").is_dir():
        pytest.skip(
            f"the AWS provider is not in {PLUGINS}: `terraform providers mirror DIR` on a "
            "machine with network, then KILN_TF_PLUGIN_DIR=DIR"
        )
    return found


def run(args: list[str], where: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TF_IN_AUTOMATION": "1", "TF_INPUT": "0", "CHECKPOINT_DISABLE": "1"}
    done = subprocess.run(args, cwd=where, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(args)} in {where}:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of terraform/ initialised from the local provider (the checkout stays clean)."""
    terraform = _terraform()
    copy = tmp_path_factory.mktemp("tf") / "terraform"
    shutil.copytree(TERRAFORM, copy, ignore=shutil.ignore_patterns(".terraform*"))
    for root in ROOTS:
        run([terraform, "init", "-backend=false", f"-plugin-dir={PLUGINS}", "-no-color"],
            copy / root)  # fmt: skip
    return copy


def test_terraform_is_formatted() -> None:
    run([_terraform(), "fmt", "-check", "-recursive", "-diff", "-no-color"], TERRAFORM)


@pytest.mark.parametrize("root", ROOTS)
def test_the_root_and_the_examples_are_valid(workdir: Path, root: str) -> None:
    said = run([_terraform(), "validate", "-no-color"], workdir / root)
    assert "The configuration is valid" in said.stdout


def test_the_planned_attributes_that_matter(workdir: Path) -> None:
    said = run([_terraform(), "test", "-no-color"], workdir)
    assert ", 0 failed" in said.stdout, said.stdout
    runs = [line for line in said.stdout.splitlines() if line.strip().startswith("run ")]
    assert len(runs) == 8, said.stdout  # every run of terraform/tests ran
    assert all(line.strip().endswith("... pass") for line in runs), said.stdout


def test_checkov_finds_nothing_beyond_the_justified_skips() -> None:
    checkov = shutil.which("checkov") or str(REPO / ".venv-tools" / "bin" / "checkov")
    if not Path(checkov).exists():
        pytest.skip("checkov is not installed: python3 -m venv .venv-tools && "
                    ".venv-tools/bin/pip install checkov")  # fmt: skip
    done = subprocess.run(
        [checkov, "--config-file", "terraform/.checkov.yaml", "--output", "cli"],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "Failed checks: 0" in done.stdout


def _render(workdir: Path, expression: str) -> str:
    """A template rendered by Terraform itself (`terraform console`)."""
    done = subprocess.run(
        [_terraform(), "console"], cwd=workdir, input=expression, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert (lines[0], lines[-1]) == ("<<EOT", "EOT"), done.stdout[:500]
    return "\n".join(lines[1:-1]) + "\n"


SECRETS = (
    'templatefile("templates/secrets.py.tftpl", {region = "us-east-1", user = "kiln", '
    'kiln_secret_arn = "arn:k", database_secret_arn = "arn:d", database_host = "db.internal", '
    'redis_secret_arn = "arn:r", redis_host = "redis.internal", stripe_secret_arn = "arn:s", '
    'nats_creds_secret_arn = "arn:n"})'
)


def test_the_hosts_boot_files_render_to_valid_python_and_cloud_init(workdir: Path) -> None:
    yaml = pytest.importorskip("yaml")
    script = _render(workdir, SECRETS)
    compile(script, "secrets.py", "exec")  # a syntax error here would stop every host
    assert '"@db.internal:5432/kiln?sslmode=require"' in script
    watcher = _render(workdir, 'templatefile("templates/lifecycle.py.tftpl", {group = "g"})')
    compile(watcher, "lifecycle.py", "exec")
    cloud_init = _render(workdir, (
        'templatefile("templates/kiln-service.yaml.tftpl", {part = "router", user = "kiln", '
        'package = "kiln[aws]==1.0", settings = {KILN_ENV = "production"}, '
        'secrets_script = "cHJpbnQoKQ==", stop_timeout_s = 45, start_now = true, '
        'extra_commands = [["echo", "hi"]], extra_files = {"/x" = "eA=="}, '
        'packages = ["python3-venv", "bubblewrap"]})'
    ))  # fmt: skip
    assert cloud_init.startswith("#cloud-config\n")
    parsed = yaml.safe_load(cloud_init)
    unit = next(f for f in parsed["write_files"] if f["path"].endswith("kiln-router.service"))
    assert "ExecStart=/opt/kiln/bin/python -m kiln.router" in unit["content"]
    assert ["systemctl", "enable", "--now", "kiln-router.service"] in parsed["runcmd"]
    assert parsed["packages"] == ["python3-venv", "bubblewrap"]
    assert "KILN_ENV=production" in next(
        f["content"] for f in parsed["write_files"] if f["path"] == "/etc/kiln/settings.env"
    )
