"""The fleet page (``GET /``): static files shipped inside the package
(``server/static/``), no build step, no CDN, so it works offline. The page
calls the JSON API with the token the user pastes; nothing here reads data.

uPlot 1.6.32 (MIT, ``static/uPlot-LICENSE.txt``) is vendored from the npm
tarball (``npm pack uplot``: ``dist/uPlot.iife.min.js``, ``dist/uPlot.min.css``).
"""
from __future__ import annotations

import importlib.resources

from ..core.errors import NotFound
from .http import Request, Response

UPLOT_VERSION = "1.6.32"
TYPES = {".html": b"text/html; charset=utf-8", ".js": b"text/javascript; charset=utf-8",
         ".css": b"text/css; charset=utf-8", ".txt": b"text/plain; charset=utf-8",
         ".svg": b"image/svg+xml"}
# No inline script or style anywhere: the policy allows files from here only.
CSP = (b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       b"connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
HEADERS = [(b"content-security-policy", CSP), (b"x-content-type-options", b"nosniff"),
           (b"referrer-policy", b"no-referrer"), (b"x-frame-options", b"DENY"),
           (b"cache-control", b"no-cache")]


def _load() -> dict[str, tuple[bytes, bytes]]:
    files = {}
    for res in (importlib.resources.files(__package__) / "static").iterdir():
        suffix = res.name[res.name.rfind("."):]
        if res.is_file() and suffix in TYPES:
            files[res.name] = (res.read_bytes(), TYPES[suffix])
    return files


FILES = _load()  # a few hundred kB, read once per worker


async def page(app, req: Request) -> Response:
    body, ctype = FILES["index.html"]
    return Response(200, body, HEADERS, ctype)


async def static(app, req: Request) -> Response:
    hit = FILES.get(req.params["name"])
    if hit is None or req.params["name"] == "index.html":
        raise NotFound(f"no such file: /static/{req.params['name']}")
    return Response(200, hit[0], HEADERS, hit[1])


ROUTES = [
    ("GET", "/", page, 0, None),
    ("GET", "/static/{name}", static, 0, None),
]
