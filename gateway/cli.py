"""``peft-gateway``: serve, and talk to a running gateway (models, pull, launch, unload, chat).

Client verbs reach the gateway at ``--url`` / ``$PEFT_GATEWAY_URL`` (default http://127.0.0.1:8000)
with ``--api-key`` / ``$PEFT_GATEWAY_API_KEY``; the verbs that use admin routes (``launch``, ``unload``)
send ``--admin-key`` / ``$PEFT_GATEWAY_ADMIN_KEY`` instead (an admin key also passes as an API key). Failures print one line, never a traceback, and the exit
code says what happened: 0 ok, 1 the gateway refused or failed the request, 2 bad usage or config,
3 the gateway could not be reached.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import httpx

from gateway.settings import AdapterSettings, ModelSettings, Settings, SettingsError, load_settings

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
DEFAULT_URL = "http://127.0.0.1:8000"


class CliError(Exception):
    """A failure to report as one line with an exit code."""

    def __init__(self, message: str, code: int = EXIT_REFUSED) -> None:
        super().__init__(message)
        self.code = code


def with_demo(settings: Settings, demo_dir: Path | None = None) -> Settings:
    """``settings`` plus the built-in demo pair (built once into the user's cache folder)."""
    from engines.demo.content import DEMO_ADAPTER_NAME, DEMO_BASE_NAME, DEMO_BASE_REPO_ID
    from engines.demo.models import ensure_demo_models

    demo = ensure_demo_models(demo_dir, log=lambda line: print(line, file=sys.stderr, flush=True))
    models = dict(settings.models)
    adapters = dict(settings.adapters)
    models.setdefault(
        DEMO_BASE_NAME,
        ModelSettings(source=str(demo.base_dir), aliases=[DEMO_BASE_REPO_ID], dtype="float32"),
    )
    adapters.setdefault(DEMO_ADAPTER_NAME, AdapterSettings(source=str(demo.adapter_dir), base=DEMO_BASE_NAME))
    return settings.model_copy(update={"models": models, "adapters": adapters, "demo": True})


# --- talking to a running gateway -------------------------------------------------------------------


class GatewayClient:
    """Thin httpx client that turns every failure into a one-line ``CliError``."""

    def __init__(self, url: str, api_key: str | None, timeout: float = 600.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def _check(self, response: httpx.Response) -> None:
        if response.is_success:
            return
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text.strip()[:300] or response.reason_phrase
        raise CliError(f"{response.status_code}: {message}")

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise CliError(f"cannot reach the gateway at {self.url} ({exc})", EXIT_UNREACHABLE) from exc
        self._check(response)
        return response.json()

    def stream_chat(self, model: str, messages: list[dict[str, str]], **params: Any) -> Iterator[str]:
        body = {"model": model, "messages": messages, "stream": True, **params}
        try:
            with self.http.stream("POST", "/v1/chat/completions", json=body) as response:
                if not response.is_success:
                    response.read()
                    self._check(response)
                for line in response.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[len("data: ") :]
                    if data == "[DONE]":
                        return
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise CliError(f"error while streaming: {chunk['error']['message']}")
                    for choice in chunk.get("choices", []):
                        text = choice.get("delta", {}).get("content")
                        if text:
                            yield text
        except httpx.TransportError as exc:
            raise CliError(f"cannot reach the gateway at {self.url} ({exc})", EXIT_UNREACHABLE) from exc


def _client(args: argparse.Namespace) -> GatewayClient:
    return GatewayClient(args.url, args.api_key)


def _admin_client(args: argparse.Namespace) -> GatewayClient:
    """A client for the admin routes: the admin key, or the API key when no admin key is given."""
    return GatewayClient(args.url, args.admin_key or args.api_key)


def cmd_models(args: argparse.Namespace) -> int:
    data = _client(args).request("GET", "/v1/models")["data"]
    if args.json:
        print(json.dumps(data, indent=2))
        return EXIT_OK
    rows = [("ID", "PARENT", "LOADED", "DTYPE", "SOURCE")]
    rows += [
        (
            m["id"],
            m.get("parent") or "-",
            "yes" if m.get("loaded") else "no",
            m.get("dtype") or "-",
            m.get("root") or "-",
        )
        for m in data
    ]
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return EXIT_OK


def _model_name(args: argparse.Namespace) -> str:
    name: str = args.name
    if getattr(args, "peft_model_id", None):
        if "+" in name:
            raise CliError("give either NAME as '<base>+<adapter>' or --peft-model-id, not both", EXIT_USAGE)
        name = f"{name}+{args.peft_model_id}"
    return name


def cmd_launch(args: argparse.Namespace) -> int:
    name = _model_name(args)
    card = _admin_client(args).request("POST", "/v1/load_model", json={"model": name})
    print(f"loaded {card['id']} ({card.get('dtype')}, {card.get('load_seconds')} s)", file=sys.stderr)
    print(card["id"])
    return EXIT_OK


def cmd_unload(args: argparse.Namespace) -> int:
    result = _admin_client(args).request("POST", "/v1/unload_model", json={"model": args.name})
    print(f"unloaded {result['id']}")
    return EXIT_OK


def cmd_chat(args: argparse.Namespace, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> int:
    """A streaming chat REPL; piped input is read line by line, one user message each."""
    client = _client(args)
    interactive = stdin.isatty() and stdout.isatty()
    history: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    params: dict[str, Any] = {"max_tokens": args.max_tokens}
    if args.temperature is not None:
        params["temperature"] = args.temperature
    if interactive:
        print(f"chatting with {args.name}; /reset clears the history, /exit quits", file=sys.stderr)
    while True:
        if interactive:
            stdout.write("> ")
            stdout.flush()
        line = stdin.readline()
        if not line:
            break
        message = line.rstrip("\n")
        if not message.strip():
            continue
        if message.strip() == "/exit":
            break
        if message.strip() == "/reset":
            history = history[:1] if args.system else []
            print("(history cleared)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": message})
        reply = ""
        for text in client.stream_chat(args.name, history, **params):
            reply += text
            stdout.write(text)
            stdout.flush()
        stdout.write("\n")
        stdout.flush()
        history.append({"role": "assistant", "content": reply})
    return EXIT_OK


def cmd_pull(args: argparse.Namespace) -> int:
    """Download a configured base and/or adapter into the HF cache ahead of time.

    Only a base that the configuration names can be pulled: ``serve`` loads configured bases only, so
    downloading any other model would succeed and leave nothing a request could use (404 at serve time).
    """
    from engines.adapters.files import fetch_adapter, resolve_adapter_ref
    from engines.demo.content import DEMO_ADAPTER_NAME, DEMO_BASE_NAME
    from engines.errors import EngineError
    from engines.loader import base_folder
    from engines.names import ModelName, is_hub_id

    settings = load_settings(args.config)
    if args.demo:
        settings = with_demo(settings)
    catalog = settings.catalog()
    try:
        name = ModelName.parse(_model_name(args))
        try:
            spec = catalog.base(name.base)
        except EngineError as exc:
            if not args.demo and name.base in (DEMO_BASE_NAME, DEMO_ADAPTER_NAME):
                raise CliError(
                    f"{exc.message} The built-in demo models need --demo; they ship with the package, "
                    "so there is nothing to download: 'peft-gateway serve --demo' serves them.",
                    EXIT_USAGE,
                ) from exc
            if is_hub_id(name.base):
                raise CliError(
                    f"{exc.message} 'serve' only loads configured models, so pulling '{name.base}' would "
                    f"download it for nothing: add it to your config first (a [models.<name>] table with "
                    f'source = "{name.base}") and pass that config with --config.',
                    EXIT_USAGE,
                ) from exc
            raise CliError(exc.message, EXIT_USAGE) from exc
        if not args.adapter_only:
            print(f"base {spec.name}: {base_folder(spec)}")
        if name.adapter is not None:
            ref = resolve_adapter_ref(catalog, spec, name.adapter, name.revision)
            print(f"adapter {name.adapter}: {fetch_adapter(ref)}")
    except EngineError as exc:
        raise CliError(exc.message) from exc
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway.app import create_app
    from gateway.logs import configure_logging
    from gateway.serving import exit_past_blocked_threads, serve

    settings = load_settings(args.config)
    overrides = {"host": args.host, "port": args.port, "log_format": args.log_format}
    server = settings.server.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    settings = settings.model_copy(update={"server": server})
    configure_logging(server.log_format, server.log_level)
    if args.demo or settings.demo:
        settings = with_demo(settings)
    if not settings.models:
        raise CliError("no models configured; pass --config FILE or --demo", EXIT_USAGE)
    ray_address = args.ray or settings.cluster.ray_address
    if ray_address:
        return _serve_on_ray(settings, ray_address)
    app = create_app(settings)
    print(
        f"peft-gateway: serving {', '.join(settings.models)} on http://{server.host}:{server.port}",
        file=sys.stderr,
        flush=True,
    )
    code = serve(app, server)
    exit_past_blocked_threads(code)
    return code


def _serve_on_ray(settings: Settings, address: str) -> int:
    """``serve --ray``: the same app as Ray Serve's ingress, engines as replicas (``gateway.cluster``)."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise CliError("serving on Ray needs Ray Serve: pip install 'peft-gateway[ray]'", EXIT_USAGE)
    from gateway.cluster.deploy import serve_on_ray

    return serve_on_ray(settings, address)


# --- argument parsing -----------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peft-gateway",
        description="OpenAI-compatible gateway: Hugging Face models with LoRA adapters merged on demand.",
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def client_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--url", default=os.environ.get("PEFT_GATEWAY_URL", DEFAULT_URL), help="gateway URL")
        sub.add_argument("--api-key", default=os.environ.get("PEFT_GATEWAY_API_KEY"), help="API key, if set")

    serve = verbs.add_parser(
        "serve", help="run the HTTP server", description="Run the gateway's HTTP server."
    )
    serve.add_argument("--config", type=Path, help="TOML config file (default: $PEFT_GATEWAY_CONFIG)")
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8000)")
    serve.add_argument("--log-format", choices=["text", "json"], help="access log format")
    serve.add_argument(
        "--demo", action="store_true", help="also serve the built-in models 'demo' and 'demo+demo-zh'"
    )
    serve.add_argument(
        "--ray",
        metavar="ADDRESS",
        help="serve on a Ray cluster: 'local' starts a private one, else a Ray address (or [cluster] ray_address)",
    )
    serve.set_defaults(handler=cmd_serve)

    models = verbs.add_parser("models", help="list configured, cached and loaded models")
    client_options(models)
    models.add_argument("--json", action="store_true", help="print the raw /v1/models data")
    models.set_defaults(handler=cmd_models)

    pull = verbs.add_parser("pull", help="download a base and/or adapter ahead of time")
    pull.add_argument("name", help="'<base>', '<base>+<adapter>' or a Hub id")
    pull.add_argument("--peft-model-id", help="adapter to download for the base NAME")
    pull.add_argument("--config", type=Path, help="TOML config file (default: $PEFT_GATEWAY_CONFIG)")
    pull.add_argument("--adapter-only", action="store_true", help="skip the base model")
    pull.add_argument("--demo", action="store_true", help="include the built-in demo models")
    pull.set_defaults(handler=cmd_pull)

    def admin_options(sub: argparse.ArgumentParser) -> None:
        client_options(sub)
        sub.add_argument(
            "--admin-key",
            default=os.environ.get("PEFT_GATEWAY_ADMIN_KEY"),
            help="admin key (one of the server's [server] admin_keys; default $PEFT_GATEWAY_ADMIN_KEY)",
        )

    launch = verbs.add_parser("launch", help="preload a model on a running gateway and print its id")
    admin_options(launch)
    launch.add_argument("name", help="'<base>' or '<base>+<adapter>'")
    launch.add_argument("--peft-model-id", help="adapter (Hub id, alias or folder) to merge into base NAME")
    launch.set_defaults(handler=cmd_launch)

    unload = verbs.add_parser("unload", help="unload a model from a running gateway")
    admin_options(unload)
    unload.add_argument("name", help="a loaded '<base>' or '<base>+<adapter>'")
    unload.set_defaults(handler=cmd_unload)

    chat = verbs.add_parser("chat", help="interactive streaming chat (also reads piped lines)")
    client_options(chat)
    chat.add_argument("name", help="model to chat with")
    chat.add_argument("--system", help="system prompt")
    chat.add_argument("--max-tokens", type=int, default=512, help="reply length limit (default 512)")
    chat.add_argument("--temperature", type=float, help="sampling temperature (default: the server's)")
    chat.set_defaults(handler=cmd_chat)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Before huggingface_hub is imported: it reads its settings once, at import.
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except SettingsError as exc:
        print(f"peft-gateway: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CliError as exc:
        print(f"peft-gateway: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
