"""Screenshot every page of the built docs site in headless Chromium, offline.

The site is served from ``site/`` on a local port; Chromium is pointed at a proxy that does not
exist, so any request that leaves the machine (a CDN script, a web font) fails exactly as it
would for a reader with no internet. What the screenshots show is what an offline reader sees.

    mkdocs build --strict
    python tools/docs_screenshots.py --out /tmp/shots --width 1280 --width 1600

Needs a ``chromium`` (or ``google-chrome``) binary on PATH; not part of the tests or CI.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import shutil
import socket
import subprocess
import threading
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(site: Path, port: int) -> http.server.ThreadingHTTPServer:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site", type=Path, default=Path("site"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--width", type=int, action="append", help="window widths (px)")
    parser.add_argument("--height", type=int, default=4000)
    parser.add_argument("--page", action="append", help="only these pages (path under site/)")
    args = parser.parse_args()
    browser = shutil.which("chromium") or shutil.which("google-chrome")
    if browser is None:
        raise SystemExit("no chromium or google-chrome on PATH")
    pages = args.page or sorted(
        str(p.relative_to(args.site)) for p in args.site.rglob("index.html") if "404" not in str(p)
    )
    args.out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = serve(args.site, port)
    try:
        for width in args.width or [1280]:
            for page in pages:
                name = page.removesuffix("index.html").strip("/").replace("/", "_") or "home"
                shot = args.out / f"{name}_{width}.png"
                subprocess.run(
                    [
                        browser, "--headless", "--no-sandbox", "--disable-gpu",
                        "--disable-background-networking",
                        # Everything but localhost goes to a proxy that refuses: offline.
                        "--proxy-server=http://127.0.0.1:9",
                        "--virtual-time-budget=15000",  # let mermaid draw before the shot
                        f"--window-size={width},{args.height}", f"--screenshot={shot}",
                        f"http://127.0.0.1:{port}/{page}",
                    ],
                    check=True, capture_output=True, timeout=120,
                )
                print(shot)
    finally:
        server.shutdown()


if __name__ == "__main__":
    main()
