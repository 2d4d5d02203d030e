"""Screenshot every page of the built docs site in headless Chromium, offline.

The site is served from ``site/`` on a local port; Chromium is pointed at a proxy that does not
exist, so any request that leaves the machine (a CDN script, a web font) fails exactly as it
would for a reader with no internet. What the screenshots show is what an offline reader sees.

    mkdocs build --strict
    python tools/docs_screenshots.py --out /tmp/shots --width 1280 --width 1600
    python tools/docs_screenshots.py --measure --width 1280     # numbers instead of pictures

``--measure`` loads every page in a frame of the given width and prints, per page, each table's
columns and how many of them are visible without scrolling, how many code blocks scroll
sideways, and how many diagrams rendered (a diagram left as source text counts as not rendered).

Needs a ``chromium`` (or ``google-chrome``) binary on PATH; not part of the tests or CI.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
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


MEASURE_PAGE = """<!doctype html><html><body><pre id="out"></pre><script>
const pages = %(pages)s, width = %(width)d;
function measure(url) {
  return new Promise(done => {
    const frame = document.createElement("iframe");
    frame.style.width = width + "px"; frame.style.height = "1000px"; frame.src = url;
    frame.onload = () => setTimeout(() => {
      const doc = frame.contentDocument, r = {page: url, tables: [], code_scrolls: 0, code: 0};
      for (const t of doc.querySelectorAll(".md-typeset table:not([class])")) {
        const box = t.closest(".md-typeset__scrollwrap") || t;  // the element that scrolls
        const right = Math.min(box.getBoundingClientRect().right, t.getBoundingClientRect().right) + 1;
        const head = t.rows[0].cells;
        r.tables.push([head.length, [...head].filter(c => c.getBoundingClientRect().right <= right).length]);
      }
      for (const c of doc.querySelectorAll("pre > code")) {
        r.code++; if (c.scrollWidth > c.clientWidth + 1) r.code_scrolls++;
      }
      r.diagrams_rendered = [...doc.querySelectorAll("div.mermaid")].filter(d => d.offsetHeight > 40).length;
      r.diagrams_as_text = doc.querySelectorAll("pre.mermaid").length;
      frame.remove(); done(r);
    }, 5000);
    document.body.appendChild(frame);
  });
}
(async () => {
  const results = [];
  for (const p of pages) results.push(await measure(p));
  document.getElementById("out").textContent = "RESULTS" + JSON.stringify(results);
})();
</script></body></html>"""


def measure(browser: str, site: Path, port: int, pages: list[str], width: int) -> None:
    name = "__measure__.html"
    (site / name).write_text(MEASURE_PAGE % {"pages": json.dumps(["/" + p for p in pages]), "width": width})
    try:
        dom = subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--proxy-server=http://127.0.0.1:9", f"--virtual-time-budget={8000 * len(pages)}",
             "--dump-dom", f"http://127.0.0.1:{port}/{name}"],
            check=True, capture_output=True, text=True, timeout=600,
        ).stdout
    finally:
        (site / name).unlink()
    results = json.loads(dom.split("RESULTS", 1)[1].split("</pre>", 1)[0].replace("&amp;", "&"))
    for r in results:
        tables = " ".join(f"{visible}/{cols}" for cols, visible in r["tables"]) or "-"
        print(f"{width}px {r['page']}: tables (visible/columns) {tables}; code blocks scrolling "
              f"{r['code_scrolls']}/{r['code']}; diagrams rendered {r['diagrams_rendered']}, "
              f"as text {r['diagrams_as_text']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site", type=Path, default=Path("site"))
    parser.add_argument("--out", type=Path, help="folder for the screenshots")
    parser.add_argument("--measure", action="store_true", help="print measurements, no pictures")
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
    if not args.measure and args.out is None:
        raise SystemExit("--out is needed for screenshots")
    port = free_port()
    server = serve(args.site, port)
    try:
        if args.measure:
            for width in args.width or [1280]:
                measure(browser, args.site, port, pages, width)
            return
        args.out.mkdir(parents=True, exist_ok=True)
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
