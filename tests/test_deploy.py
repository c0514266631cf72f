"""Deployment files: ``compose.yaml`` validates, and the image's entry command is one the CLI accepts.

No Docker engine is needed: ``docker-compose config`` only parses and resolves the file (Debian's
``docker-compose`` package; the test skips without it), and the Dockerfile's ENTRYPOINT + CMD go through
the CLI's own argument parsing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"


def _compose_config(*extra: str) -> dict[str, Any]:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    env = {k: v for k, v in os.environ.items() if k not in {"GATEWAY_CONFIG", "HF_TOKEN"}}
    result = subprocess.run(
        [binary, "-f", str(COMPOSE), *extra, "config"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    import yaml  # docker-compose's output is YAML; PyYAML comes with transformers and huggingface_hub

    config: dict[str, Any] = yaml.safe_load(result.stdout)
    return config


def _dockerfile_instruction(name: str) -> list[str]:
    """The exec-form (JSON array) argument of the last ``name`` instruction in the Dockerfile."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    matches = re.findall(rf"^{name}\s+(\[.*\])\s*$", text, flags=re.MULTILINE)
    assert matches, f"no exec-form {name} in the Dockerfile"
    value: list[str] = json.loads(matches[-1])
    return value


def test_compose_validates_with_volume_healthcheck_and_port() -> None:
    config = _compose_config()
    gateway = config["services"]["gateway"]
    assert "build" in gateway

    ports = gateway["ports"]
    assert any(str(p.get("target") if isinstance(p, dict) else p).endswith("8000") for p in ports), ports

    volumes = gateway["volumes"]
    as_text = [v if isinstance(v, str) else f"{v.get('source')}:{v.get('target')}" for v in volumes]
    cache = [v for v in as_text if v.split(":")[1] == "/data/hf"]
    assert cache and cache[0].split(":")[0] in config["volumes"], "the HF cache is a named volume"
    cfg = [v for v in as_text if v.split(":")[1] == "/config/config.toml"]
    assert cfg and cfg[0].endswith(":ro"), "the config is mounted read-only"
    assert Path(cfg[0].split(":")[0]).name in {"config.example.toml", "config.toml"}
    assert Path(cfg[0].split(":")[0]).is_file()
    assert gateway["environment"]["HF_HOME"] == "/data/hf"

    check = gateway["healthcheck"]
    assert "/health" in " ".join(check["test"])
    assert check["test"][0] in {"CMD", "CMD-SHELL"}

    # Prometheus only under the "monitoring" profile, scraping the gateway's /metrics.
    prometheus = config["services"]["prometheus"]
    assert prometheus["profiles"] == ["monitoring"]
    scrape = (ROOT / "prometheus.yml").read_text()
    assert "gateway:8000" in scrape and "/metrics" in scrape


def test_compose_monitoring_profile_validates() -> None:
    # docker-compose 1.x lists every service whatever the profile, so the profile itself is checked above.
    prometheus = _compose_config("--profile", "monitoring")["services"]["prometheus"]
    assert prometheus["image"].startswith("prom/prometheus:")
    mounts = [
        v if isinstance(v, str) else f"{v.get('source')}:{v.get('target')}" for v in prometheus["volumes"]
    ]
    assert any(m.split(":")[0].endswith("prometheus.yml") for m in mounts), mounts


def test_compose_has_commented_gpu_reservation() -> None:
    text = COMPOSE.read_text()
    assert re.search(r"^\s*#\s*deploy:", text, flags=re.MULTILINE)
    assert re.search(r"^\s*#\s*-\s*driver:\s*nvidia", text, flags=re.MULTILINE)


def test_dockerfile_basics() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, flags=re.MULTILINE)
    torch = text.index("download.pytorch.org/whl/cpu")
    assert "torch==2.13.0" in text and torch < text.index("pip install ."), "CPU torch comes first"
    assert re.search(r"^USER (?!root\b)\S+", text, flags=re.MULTILINE), "runs as a non-root user"
    assert re.search(r"^ENV\b[^\n]*(\\\n[^\n]*)*HF_HOME=/data/hf", text, flags=re.MULTILINE)
    assert re.search(r"^EXPOSE 8000$", text, flags=re.MULTILINE)
    healthcheck = re.search(r"^HEALTHCHECK\b.*?CMD (\[.*\])$", re.sub(r"\\\n", " ", text), flags=re.MULTILINE)
    assert healthcheck and "urllib" in healthcheck.group(1) and "/health" in healthcheck.group(1)
    assert _dockerfile_instruction("ENTRYPOINT") == ["peft-gateway"]


def _peft_gateway() -> list[str]:
    script = shutil.which("peft-gateway") or shutil.which(
        "peft-gateway", path=str(Path(sys.executable).parent)
    )
    assert script, "the peft-gateway console script is not installed (pip install -e .)"
    return [script]


def test_serve_help_exits_zero() -> None:
    result = subprocess.run(
        [*_peft_gateway(), "serve", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "--config" in result.stdout and "--host" in result.stdout


def test_image_command_is_accepted_by_the_cli() -> None:
    """ENTRYPOINT + CMD exactly as the image runs them go through the entry command's own argument
    parsing, in process and without ``--help`` (which would exit before an unknown flag is reported)."""
    from importlib.metadata import entry_points

    from gateway import cli

    entrypoint = _dockerfile_instruction("ENTRYPOINT")
    command = _dockerfile_instruction("CMD")
    assert command[0] == "serve" and "--config" in command and "/config/config.toml" in command
    (script,) = entry_points(group="console_scripts", name=entrypoint[0])
    assert script.load() is cli.main  # the image's entry command is the CLI parsed here
    args = cli._parser().parse_args([*entrypoint[1:], *command])  # an unknown flag exits 2 here
    assert args.handler is cli.cmd_serve
    assert args.config == Path("/config/config.toml") and args.host == "0.0.0.0"
    with pytest.raises(SystemExit) as refused:  # the parser this relies on does refuse a misspelt flag
        cli._parser().parse_args([*entrypoint[1:], *command, "--confg", "/config/config.toml"])
    assert refused.value.code == 2
