"""compose.yaml's ``ray`` profile: it validates, and its gateway command is one the CLI accepts."""

from __future__ import annotations

import re

from gateway.cli import _parser
from tests.test_deploy import DOCKERFILE, _compose_config


def test_compose_ray_profile_has_head_worker_and_gateway() -> None:
    services = _compose_config("--profile", "ray")["services"]
    head, worker, gateway = services["ray-head"], services["ray-worker"], services["ray-gateway"]
    assert head["build"]["args"]["EXTRAS"] == "[ray]"
    assert "--head" in head["command"] and head["entrypoint"] == ["ray"]
    assert "--address=ray-head:6379" in worker["command"]
    assert head["image"] == worker["image"] == gateway["image"]
    assert [p["target"] for p in head["ports"]] == [8000], "Serve's HTTP proxy runs on the head"
    assert "ray-head" in gateway["depends_on"]


def test_compose_ray_gateway_command_parses() -> None:
    command = _compose_config("--profile", "ray")["services"]["ray-gateway"]["command"]
    args = _parser().parse_args(command)
    assert args.ray == "ray://ray-head:10001" and args.host == "0.0.0.0"


def test_dockerfile_installs_the_extras_it_is_built_with() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG EXTRAS=", text, flags=re.MULTILINE)
    assert "pip install .${EXTRAS} " in text
