"""``peft-gateway``: the command line. ``serve`` runs the HTTP server (``--demo`` adds the demo models)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from gateway.settings import AdapterSettings, ModelSettings, Settings, SettingsError, load_settings

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_RUNTIME = 1


def with_demo(settings: Settings, demo_dir: Path | None = None) -> Settings:
    """``settings`` plus the built-in demo pair (built once into the user's cache folder)."""
    from engines.demo import DEMO_ADAPTER_NAME, DEMO_BASE_NAME, DEMO_BASE_REPO_ID, ensure_demo_models

    demo = ensure_demo_models(demo_dir, log=lambda line: print(line, file=sys.stderr, flush=True))
    models = dict(settings.models)
    adapters = dict(settings.adapters)
    models.setdefault(
        DEMO_BASE_NAME,
        ModelSettings(
            source=str(demo.base_dir), aliases=[DEMO_BASE_REPO_ID], dtype="float32", context_length=512
        ),
    )
    adapters.setdefault(DEMO_ADAPTER_NAME, AdapterSettings(source=str(demo.adapter_dir), base=DEMO_BASE_NAME))
    return settings.model_copy(update={"models": models, "adapters": adapters, "demo": True})


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peft-gateway",
        description="OpenAI-compatible gateway serving Hugging Face models with LoRA adapters merged on demand.",
    )
    verbs = parser.add_subparsers(dest="verb", required=True)
    serve = verbs.add_parser("serve", help="run the HTTP server")
    serve.add_argument("--config", type=Path, help="TOML config file (default: $PEFT_GATEWAY_CONFIG)")
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8000)")
    serve.add_argument(
        "--demo", action="store_true", help="also serve the built-in demo models 'demo' and 'demo+demo-zh'"
    )
    return parser


def _configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.server.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.app import create_app

    settings = load_settings(args.config)
    server = settings.server.model_copy(
        update={k: v for k, v in {"host": args.host, "port": args.port}.items() if v is not None}
    )
    settings = settings.model_copy(update={"server": server})
    _configure_logging(settings)
    if args.demo or settings.demo:
        settings = with_demo(settings)
    if not settings.models:
        print("peft-gateway: no models configured; pass --config or --demo", file=sys.stderr)
        return EXIT_CONFIG
    app = create_app(settings)
    print(
        f"peft-gateway: serving {', '.join(settings.models)} on http://{server.host}:{server.port}",
        file=sys.stderr,
    )
    uvicorn.run(
        app, host=server.host, port=server.port, log_level=settings.server.log_level, access_log=False
    )
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.verb == "serve":
            return serve(args)
    except SettingsError as exc:
        print(f"peft-gateway: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return EXIT_OK
    return EXIT_CONFIG


if __name__ == "__main__":
    raise SystemExit(main())
