"""Count the code one `LLM.generate` call runs at stage 03 on the torch path: every folovllm
function executed (unique code objects, comprehensions and lambdas left out) with its line span,
and the files they live in. docs/architecture.md quotes it; run it on an older checkout with
`PYTHONPATH=<checkout> python tools/step_walk.py` to compare.

    python tools/step_walk.py            # prints JSON: functions, lines, files, file_list
"""
import os, sys, json
os.environ.setdefault("FOLOVLLM_CONFIGURE_LOGGING", "0")
import folovllm
from folovllm import LLM, SamplingParams
try:
    from folovllm.testing.tiny_model import build_tiny_checkpoint
except ImportError:
    from folovllm.tiny_model import build_tiny_checkpoint
from pathlib import Path
root = Path(folovllm.__file__).parent
import tempfile
ckpt = build_tiny_checkpoint(Path(tempfile.mkdtemp()) / "ckpt", arch="qwen3")
llm = LLM(str(ckpt), stage=3, dtype="float32", custom_ops="none", max_model_len=256)
params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
llm.generate(["hello world", "the engine"], params, use_tqdm=False)  # warm
seen = {}
def tracer(frame, event, arg):
    co = frame.f_code
    if co.co_filename.startswith(str(root)) and co not in seen:
        lines = [l for _, _, l in co.co_lines() if l is not None]
        seen[co] = (co.co_filename, co.co_name, co.co_firstlineno, max(lines) - co.co_firstlineno + 1 if lines else 1)
    return None
sys.setprofile(lambda *a: None)
sys.settrace(tracer)
llm.generate(["hello world", "the engine"], params, use_tqdm=False)
sys.settrace(None)
funcs = [v for v in seen.values() if v[1] not in ("<genexpr>", "<listcomp>", "<dictcomp>", "<setcomp>", "<lambda>")]
files = sorted({os.path.relpath(f, root.parent) for f, *_ in funcs})
print(json.dumps({"functions": len(funcs), "lines": sum(n for *_, n in funcs), "files": len(files), "file_list": files}))
