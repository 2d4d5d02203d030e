"""Timeline pictures of step traces (matplotlib, PNG): one column per traced engine, four panels
(three with `step_time=False`)::

    request lanes   one row per request, one cell per step:
                    waiting / prefill / chunk / decode / stalled / idle / preempted,
                    x = preempted here, o = finished here, "hit N" = N prompt tokens cached,
                    "a/d" in a cell = a of the d drafts it verified were accepted (stage 09)
    KV cache        tokens reserved (blocks x block size, filled) and holding a live token
                    (line), against the cache's capacity (dashed)
    tokens/step     prompt (blue), decode (green) and padding (grey) tokens; the budget (red)
    step time       wall-clock milliseconds of each step (the only panel that varies by run)

Columns share their y-axes row by row, so the same workload at two stages compares at a glance.
matplotlib is imported only here, when a picture is drawn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from folovllm.engine.stats import SchedulerStats
from folovllm.trace.recorder import LANE_COLORS, LANE_STATES, StepTracer, request_lanes, step_tokens


def plot_traces(columns: Sequence[tuple[str, StepTracer]], out: Path, title: str = "",
                step_time: bool = True, columns_per_row: int = 0) -> Path:
    """Draw each (label, tracer) as a column of panels; write a PNG to `out`. `step_time=False`
    leaves out the only panel that changes from run to run (the docs' committed pictures).
    `columns_per_row` > 0 wraps the columns into several rows of that many (six stages side by
    side would be ~3,400 px wide, unreadable on a page); every panel of one kind still shares
    its y-axis with the same panel of every other column, wherever it sits::

        columns_per_row=2, 5 columns      [c0 c1]   each cell: lanes / KV / tokens (/ time)
                                          [c2 c3]
                                          [c4   ]   (the empty cell is hidden)
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    num_requests = max(len(request_lanes(tracer.steps)) for _, tracer in columns)
    lane_height = max(1.6, 0.28 * num_requests)
    panels = [("request", lane_height, _lanes), ("KV cache\n(tokens)", 1.2, _kv),
              ("tokens\nper step", 1.2, _tokens)]
    if step_time:
        panels.append(("step\ntime (ms)", 1.0, _step_time))
    per_row = columns_per_row if 0 < columns_per_row < len(columns) else len(columns)
    grid_rows = -(-len(columns) // per_row)  # ceil
    heights = [h for _, h, _ in panels]
    fig = plt.figure(layout="constrained",
                     figsize=(5.2 * per_row, (sum(heights) + 0.8) * grid_rows + 0.8))
    cells = fig.subfigures(grid_rows, per_row, squeeze=False)
    first_of_kind: dict[int, Any] = {}  # panel kind -> the axes every other one shares y with
    for index, cell_fig in enumerate(cells.flat):
        if index >= len(columns):  # the empty cells of the last row
            continue
        label, tracer = columns[index]
        cell = cell_fig.subplots(len(panels), 1, sharex=True, gridspec_kw={"height_ratios": heights})
        for k, (ax, (name, _, draw)) in enumerate(zip(cell, panels)):
            if k in first_of_kind:
                ax.sharey(first_of_kind[k])
            first_of_kind.setdefault(k, ax)
            draw(ax, list(tracer.steps), tracer.config)
            if index % per_row == 0:
                ax.set_ylabel(name, fontsize=9)
        cell[0].set_title(label, fontsize=10)
        cell[-1].set_xlabel("engine step")
        cell[-1].xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole
    handles = [Patch(color=LANE_COLORS[s], label=s) for s in LANE_STATES]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8,
               frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def _lanes(ax: Any, steps: list[SchedulerStats], config: dict[str, Any]) -> None:
    lanes = list(request_lanes(steps).values())
    for y, lane in enumerate(lanes):
        for step, state in lane.states.items():
            ax.barh(y, 1.0, left=step - 0.5, height=0.8, color=LANE_COLORS[state], linewidth=0)
        for step in lane.preempted_at:
            ax.plot(step + 0.5, y, marker="x", color="black", markersize=6)
        if lane.finished_at is not None:
            ax.plot(lane.finished_at + 0.5, y, marker="o", color="black", markersize=3.5)
        for step, (drafted, accepted) in lane.drafts.items():  # stage 09
            ax.text(step, y, f"{accepted}/{drafted}", fontsize=5, va="center", ha="center", color="white")
        if lane.cached_tokens:
            first = min(s for s, st in lane.states.items() if st != "waiting")
            ax.text(first - 0.5, y, f"hit {lane.cached_tokens}", fontsize=6, va="center", ha="right")
    ax.set_yticks(range(len(lanes)), [lane.request_id for lane in lanes], fontsize=7)
    ax.set_ylim(max(len(lanes), 1) - 0.5, -0.5)  # first request on top
    ax.grid(axis="x", alpha=0.3)


def _kv(ax: Any, steps: list[SchedulerStats], config: dict[str, Any]) -> None:
    x = [s.step for s in steps]
    ax.fill_between(x, [s.kv_tokens_reserved for s in steps], step="mid", color="#c6dbef",
                    label="reserved")
    ax.step(x, [s.kv_tokens_used for s in steps], where="mid", color="#08519c", lw=1.2,
            label="holding tokens")
    capacity = config["num_blocks"] * config["block_size"]
    ax.axhline(capacity, color="black", ls="--", lw=0.8)
    ax.text(0.99, 0.95, f"capacity {capacity} = {config['num_blocks']} x {config['block_size']}",
            transform=ax.transAxes, ha="right", va="top", fontsize=7)
    ax.legend(fontsize=7, loc="center right", frameon=False)


def _tokens(ax: Any, steps: list[SchedulerStats], config: dict[str, Any]) -> None:
    x = [s.step for s in steps]
    prefill, decode = zip(*map(step_tokens, steps)) if steps else ((), ())
    padding = [s.num_scheduled_tokens - p - d for s, p, d in zip(steps, prefill, decode)]
    ax.bar(x, prefill, width=0.9, color=LANE_COLORS["prefill"], label="prompt")
    ax.bar(x, decode, width=0.9, bottom=prefill, color=LANE_COLORS["decode"], label="decode")
    ax.bar(x, padding, width=0.9, bottom=[p + d for p, d in zip(prefill, decode)],
           color=LANE_COLORS["idle"], label="padding / idle")
    budget = config["max_num_batched_tokens"]
    highest = max((s.num_scheduled_tokens for s in steps), default=1)
    if budget <= 2 * highest:
        ax.axhline(budget, color="red", ls="--", lw=0.9)
        ax.text(0.99, 0.95, f"budget {budget}", transform=ax.transAxes, ha="right", va="top",
                fontsize=7, color="red")
    else:
        ax.text(0.99, 0.95, f"budget {budget} (off the scale)", transform=ax.transAxes,
                ha="right", va="top", fontsize=7, color="red")
    ax.legend(fontsize=7, loc="center right", frameon=False)


def _step_time(ax: Any, steps: list[SchedulerStats], config: dict[str, Any]) -> None:
    ax.bar([s.step for s in steps], [(s.end_time - s.start_time) * 1e3 for s in steps], width=0.9,
           color="#666666")
