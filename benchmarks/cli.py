"""The one `main()` of every benchmark script: the common options, the record, the table, the
files. A script keeps only what is its own:

    def add_options(p): p.add_argument("--baseline-stage", ...)      # its own options, if any
    def run(args) -> dict: ...                                        # what it measured
    def render_markdown(result) -> str: ...                           # caption + tables, from the record

    def main(argv=None) -> int:
        return bench_main("benchmarks.stage06_prefix", __doc__, argv, run, render_markdown,
                          name="stage06_prefix_cpu", options=add_options)

`bench_main` parses the options every benchmark has (`--repeats --threads --quick --out --name
--no-write --render`), pins torch's threads (the record notes them), starts the record
(`results.result_record`: command, date, git commit, machine first), adds what `run` returns,
prints the markdown and writes `<out>/<name>.json` and `.md` unless `--quick` (a smoke run:
small shapes, printed only) or `--no-write`. `--render JSON` only rewrites a results file's
`.md` from its `.json` (after a change to the table's format), running nothing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from benchmarks.results import RESULTS_DIR, machine_short, result_record, write_results

Options = Callable[[argparse.ArgumentParser], None]
# the results file's default name: fixed, or from the options and the finished record
Name = Union[str, Callable[[argparse.Namespace, dict[str, Any]], str]]


def bench_parser(module: str, doc: str, repeats: int, options: Optional[Options]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {module}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=repeats,
                   help=f"timed repeats, interleaved across systems (default {repeats})")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--quick", action="store_true", help="smoke run: small shapes, printed, not written")
    p.add_argument("--out", default=str(RESULTS_DIR), help="folder for <name>.json and <name>.md")
    p.add_argument("--name", default=None, help="results file name (default: the script's)")
    p.add_argument("--no-write", action="store_true", help="print the table, write nothing")
    p.add_argument("--render", metavar="JSON", default=None,
                   help="only rewrite <JSON minus .json>.md from an existing results file")
    if options is not None:
        options(p)
    return p


def bench_main(module: str, doc: Optional[str], argv: Optional[list[str]],
               run: Callable[[argparse.Namespace], dict[str, Any]],
               render: Callable[[dict[str, Any]], str], *, name: Name, repeats: int = 3,
               options: Optional[Options] = None,
               written: Optional[Callable[[argparse.Namespace, dict[str, Any], str], None]] = None) -> None:
    """Parse, run, record, print, write; then `written(args, result, name)` (e.g. a plot of
    what was written), if given and something was."""
    p = bench_parser(module, doc or "", repeats, options)
    args = p.parse_args(argv)
    if args.render:
        src = Path(args.render)
        md = render(json.loads(src.read_text()))
        src.with_suffix(".md").write_text(md)
        print(md + f"\nwrote {src.with_suffix('.md')}")
        return
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    torch.set_num_threads(args.threads)
    result = result_record(module, argv, repeats=args.repeats)  # after set_num_threads
    print(f"{result['command']}\nmachine: {machine_short(result['machine'])}", flush=True)
    result.update(run(args))
    markdown = render(result)
    print("\n" + markdown)
    if args.quick or args.no_write:
        return
    out_name = args.name or (name if isinstance(name, str) else name(args, result))
    write_results(args.out, out_name, result, markdown)
    if written is not None:
        written(args, result, out_name)

