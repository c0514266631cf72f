"""``GET /``: the chat playground, one self-contained HTML page (``gateway/static/index.html``).

The page's CSS and JavaScript are inline, so the Content-Security-Policy allows exactly those blocks by
their SHA-256 hashes (no ``'unsafe-inline'``) and otherwise only this origin: nothing external can load,
and an injected script or style would not run. The page asks for the API key itself, so ``/`` is public.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from importlib import resources

from starlette.requests import Request
from starlette.responses import Response

_INLINE = re.compile(r"<(script|style)>(.*?)</\1>", re.DOTALL)


def _sha256_source(text: str) -> str:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return f"'sha256-{base64.b64encode(digest).decode()}'"


def content_security_policy(html: str) -> str:
    """Only this origin, plus the page's own inline ``<script>`` and ``<style>`` blocks by hash."""
    hashes: dict[str, list[str]] = {"script": [], "style": []}
    for tag, body in _INLINE.findall(html):
        hashes[tag].append(_sha256_source(body))
    return "; ".join(
        [
            "default-src 'self'",
            "script-src " + " ".join(hashes["script"] or ["'none'"]),
            "style-src " + " ".join(hashes["style"] or ["'none'"]),
            "connect-src 'self'",
            "img-src 'self'",
            "object-src 'none'",
            "base-uri 'none'",
            "form-action 'self'",
            "frame-ancestors 'none'",
            "require-trusted-types-for 'script'",
        ]
    )


@functools.cache
def _page() -> tuple[bytes, str]:
    html = resources.files("gateway").joinpath("static", "index.html").read_text(encoding="utf-8")
    return html.encode("utf-8"), content_security_policy(html)


async def playground(request: Request) -> Response:
    body, csp = _page()
    return Response(
        body,
        headers={
            "Content-Type": "text/html; charset=utf-8",
            "Content-Security-Policy": csp,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-cache",
        },
    )
