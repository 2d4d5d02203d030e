"""`folovllm trace --serve`: a live page of a running engine, from its step records.

    engine thread                          server threads (http.server, standard library)
    -------------                          ----------------------------------------------
    engine.step()                          GET /        the page (HTML + a little JavaScript)
      stat_loggers: view.record(step)
        -- snapshot ---------------------> GET /state   the latest snapshot, as JSON
                                           the page polls /state and redraws: requests running
                                           and waiting, KV blocks in use, the last steps'
                                           timeline (one lane per request, one cell per step)

The view subscribes to the engine's per-step record like any other observer, and builds a new
snapshot from it on the engine's thread after every step, then swaps one reference: the server
never reads the engine at all (no lock, no torn reads). The standard library's server is enough
for one page and a handful of viewers, and adds no dependency.

Here the engine replays a named workload over and over (`--workload`), paced by `--step-delay`
so a person can follow it; `folovllm serve --trace` mounts the same page at /trace/ of the
OpenAI server, following the requests its clients send (`mount_live_page`).
"""

from __future__ import annotations

import itertools
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from folovllm.engine.stats import SchedulerStats
from folovllm.trace.recorder import LANE_COLORS, LANE_STATES, StepTracer, engine_summary, request_lanes

if TYPE_CHECKING:
    from fastapi import FastAPI

    from folovllm.config import EngineConfig
    from folovllm.engine.llm_engine import LLMEngine
    from folovllm.trace.workloads import TraceWorkload

WINDOW = 40  # steps shown in the timeline


class LiveView:
    """The page's data: one JSON snapshot, rebuilt from each step's record on the engine's
    thread. `tracer` keeps the last steps (the timeline); `seated` the running requests as of
    their last row (a stalled request keeps its numbers), in the order they were admitted."""

    def __init__(self, tracer: StepTracer) -> None:
        self.tracer = tracer
        self.seated: dict[str, dict[str, Any]] = {}
        self.snapshot = json.dumps({"step": 0, "running": [], "waiting": [], "kv": None,
                                    "timeline": {"steps": [], "lanes": []}}).encode()

    @classmethod
    def follow(cls, engine: "LLMEngine", window: int = WINDOW) -> "LiveView":
        """A view subscribed to `engine`'s per-step record, keeping the last `window` steps."""
        view = cls(StepTracer(engine_summary(engine), max_steps=window))
        engine.stat_loggers.append(view.record)
        return view

    def record(self, step: SchedulerStats) -> None:
        self.tracer.record(step)
        rows = [r for r in step.rows if r.kind != "idle" and not r.finish_reason]
        keep = {r.request_id for r in rows}.union(step.stalled)
        self.seated = {rid: seat for rid, seat in self.seated.items() if rid in keep}
        for r in rows:
            self.seated[r.request_id] = {"id": r.request_id, "blocks": r.num_blocks,
                                         "computed": r.num_computed_tokens + r.num_new_tokens}
        steps, config = list(self.tracer.steps), self.tracer.config
        numbers = [s.step for s in steps]
        lanes = [{"id": ln.request_id, "states": [ln.states.get(n) for n in numbers],
                  "drafts": [ln.drafts.get(n) for n in numbers]}  # stage 09: [verified, accepted]
                 for ln in request_lanes(steps).values()]
        self.snapshot = json.dumps({
            "step": step.step,
            "stage": config["stage"],
            "engine": config.get("engine"),
            "running": list(self.seated.values()),
            "waiting": step.waiting,
            "kv": {"used": step.kv_blocks_used, "total": config["num_blocks"],
                   "block_size": config["block_size"]},
            "tokens": {"last": step.num_scheduled_tokens, "budget": config["max_num_batched_tokens"]},
            "timeline": {"steps": numbers, "lanes": lanes},
        }).encode()  # one reference swap: readers see the old snapshot or the new one


def make_server(view: LiveView, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """An HTTP server for the page (port 0 = any free port: `server.server_address[1]`).
    Run it with `serve_forever()` in a thread; stop it with `shutdown()` then `server_close()`."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            path = self.path.split("?")[0]
            if path == "/":
                self._send(200, "text/html; charset=utf-8", PAGE.encode())
            elif path == "/state":
                self._send(200, "application/json", view.snapshot)
            else:
                self._send(404, "text/plain", b"not found: try / or /state")

        def _send(self, code: int, content_type: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Cache-Control", "no-store")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:  # one line per poll would drown the console
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


def run_workload_forever(engine: "LLMEngine", workload: "TraceWorkload", step_delay: float,
                         stop: threading.Event) -> None:
    """Replay `workload` round after round (new request ids each round) until `stop` is set."""
    from folovllm.trace.workloads import replay

    def on_step(_: Any) -> None:
        if stop.wait(step_delay):
            raise _Stopped

    try:
        for round_ in itertools.count(1):
            replay(engine, workload, seed=round_, id_prefix=f"{round_}.", on_step=on_step)
    except _Stopped:
        pass


class _Stopped(Exception):
    pass


def serve(model: str, config: "EngineConfig", workload: "TraceWorkload", host: str, port: int,
          step_delay: float) -> int:
    """`folovllm trace --serve`: serve the page and run the engine until Ctrl-C."""
    from folovllm.engine.llm_engine import LLMEngine

    engine = LLMEngine(model, config)
    view = LiveView.follow(engine)  # a server runs for hours: it keeps the window only
    server = make_server(view, host, port)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    print(f"live trace of stage {config.stage}, workload '{workload.name}': "
          f"http://{host}:{server.server_address[1]}/  (Ctrl-C to stop)", flush=True)
    try:
        run_workload_forever(engine, workload, step_delay, threading.Event())
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        server.server_close()
    return 0


def mount_live_page(app: "FastAPI", engine: "LLMEngine") -> None:
    """The same page inside the OpenAI server (`folovllm serve --trace`), at /trace/: the
    view keeps the engine's last `WINDOW` steps, and the snapshot is rebuilt on the engine's
    thread after each step, while the event loop serves the latest one. It shows request ids
    and token counts, never text; with an API key it needs the key like /v1/* (the server's
    `RequestGate`; a browser may give it as the HTTP Basic password)."""
    from fastapi.responses import HTMLResponse, Response

    view = LiveView.follow(engine)

    @app.get("/trace/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE)

    @app.get("/trace/state", include_in_schema=False)
    async def state() -> Response:
        return Response(view.snapshot, media_type="application/json", headers={"Cache-Control": "no-store"})


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>folovllm live trace</title>
<style>
 body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }
 .stats span { margin-right: 1.5em; } .stats b { font-size: 1.2em; }
 #kv-bar { width: 320px; height: 12px; background: #eee; display: inline-block; vertical-align: middle; }
 #kv-fill { height: 100%; background: #1f5fa8; width: 0; }
 .lists { display: flex; gap: 3em; margin: 1em 0; } table { border-collapse: collapse; }
 td, th { padding: 1px 8px; text-align: right; } th { border-bottom: 1px solid #ccc; }
 .lane { display: flex; align-items: center; height: 14px; margin: 1px 0; }
 .lane .name { width: 5em; font-size: 11px; } .cell { width: 12px; height: 12px; margin-right: 1px; }
 .legend span { display: inline-block; margin-right: 1em; font-size: 12px; }
 .legend i { display: inline-block; width: 10px; height: 10px; margin-right: 4px; }
 __STATE_CSS__
</style></head>
<body data-updates="0">
<h1>folovllm: what the engine is doing</h1>
<p id="engine">-</p>
<div class="stats">
 <span>stage <b id="stage">-</b></span><span>step <b id="step">0</b></span>
 <span>running <b id="num-running">0</b></span><span>waiting <b id="num-waiting">0</b></span>
 <span>KV blocks in use <b id="kv-used">0</b> / <b id="kv-total">0</b>
   <span id="kv-bar"><span id="kv-fill" style="display:block"></span></span></span>
 <span>tokens last step <b id="tokens">0</b> / budget <b id="budget">-</b></span>
</div>
<div class="lists">
 <div><h3>running</h3><table><thead><tr><th>request</th><th>tokens computed</th><th>blocks</th></tr></thead>
   <tbody id="running"></tbody></table></div>
 <div><h3>waiting</h3><div id="waiting"></div></div>
</div>
<h3>last steps (one lane per request, one cell per step, newest on the right)</h3>
<div class="legend">__LEGEND__</div>
<div id="timeline"></div>
<script>
const $ = (id) => document.getElementById(id);
function render(s) {
  $("stage").textContent = s.stage ?? "-";
  $("engine").textContent = s.engine ?? "-";
  $("step").textContent = s.step;
  $("num-running").textContent = s.running.length;
  $("num-waiting").textContent = s.waiting.length;
  if (s.kv) {
    $("kv-used").textContent = s.kv.used; $("kv-total").textContent = s.kv.total;
    $("kv-fill").style.width = (100 * s.kv.used / Math.max(s.kv.total, 1)) + "%";
    $("tokens").textContent = s.tokens.last; $("budget").textContent = s.tokens.budget;
  }
  $("running").innerHTML = s.running.map(r =>
    `<tr class="req" data-id="${r.id}"><td>${r.id}</td><td>${r.computed}</td><td>${r.blocks}</td></tr>`).join("");
  $("waiting").textContent = s.waiting.join(" ") || "(none)";
  $("timeline").innerHTML = s.timeline.lanes.map(l =>
    `<div class="lane" data-id="${l.id}"><span class="name">${l.id}</span>` +
    l.states.map((st, i) => `<span class="cell ${st ?? "none"}" data-state="${st ?? ""}" ` +
      `title="step ${s.timeline.steps[i]}: ${st ?? "-"}` +
      `${l.drafts[i] ? `, drafts ${l.drafts[i][1]}/${l.drafts[i][0]} accepted` : ""}"></span>`).join("") +
    `</div>`).join("");
  document.body.dataset.updates = Number(document.body.dataset.updates) + 1;
}
async function poll() {
  // relative: the page works wherever it is mounted (/ here, /trace/ in a bigger server)
  try { const r = await fetch("state", {cache: "no-store"}); render(await r.json()); }
  catch (e) { /* the engine stopped: keep the last picture */ }
  setTimeout(poll, 250);
}
poll();
</script></body></html>
""".replace("__STATE_CSS__", " ".join(f".cell.{k} {{ background: {v}; }}" for k, v in LANE_COLORS.items())
            ).replace("__LEGEND__", "".join(f'<span><i class="cell {k}"></i>{k}</span>' for k in LANE_STATES))
