"""Every fenced code block of README.md and docs/*.md runs, on the backend of the test run.

Rules (what a doc author needs to know):

* ```` ```python ```` blocks run in order, one namespace per file (like a notebook), with
  KERAS_BACKEND of the test run (keras is imported first, so a block's
  ``os.environ.setdefault("KERAS_BACKEND", ...)`` changes nothing).
* ```` ```bash ```` (or ``sh``, ``shell``) blocks run with ``bash -e -o pipefail``, in the same
  order and the same working directory as the file's Python blocks: a fresh temporary
  directory per file, holding links to the repository's ``recipes/``, ``benchmarks/`` and
  ``scripts/``, with the virtual environment's ``bin/`` first on PATH (``poa-keras`` is the
  installed command). ``$POA_KERAS_REPO`` is the repository root. Keep pipes safe: with
  pipefail, ``cmd | head`` fails when ``cmd`` dies of the closed pipe.
* ```` ```text ````, ```` ```console ```` (shown output, illustrative commands), ```` ```json ````
  (must parse) and a few other display languages are not executed. A fence without a language
  is an error: say what a block is.
* A runnable block that is too heavy to run (an ImageNet command, a setup script) is marked
  with ``<!-- not-run: why -->`` on the line above its fence. Such skips must stay rare
  (``MAX_NOT_RUN``) and give a reason.

How: the files are split into groups that run at the same time in subprocesses (this file run
as a script): the files with Python blocks in ``PYTHON_PROCESSES`` groups balanced by a rough
cost, and the files with shell blocks only (e.g. docs/cli.md) in one more. Each subprocess
writes per-file results (the error with the failing block's file and line, seconds, output) to
JSON; one test per file reports them. The block-level machinery is tested in-process on
synthetic markdown (cheap).
"""
from __future__ import annotations

import contextlib
import gc
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = ["README.md"] + sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))

RUN_LANGUAGES = {"python": "python", "py": "python", "bash": "bash", "sh": "bash",
                 "shell": "bash"}
SHOW_LANGUAGES = {"text", "console", "json", "toml", "yaml", "ini", "csv", "markdown", "diff"}
MAX_NOT_RUN = 4                    # skipped runnable blocks, over all files
BLOCK_TIMEOUT_S = 600              # one shell block
LINKED_DIRS = ("recipes", "benchmarks", "scripts")
PYTHON_PROCESSES = 2               # runner processes for the files with Python blocks (2 cores)

_FENCE = re.compile(r"^( {0,3})(`{3,})\s*([^`\s]*)[^`]*$")
_NOT_RUN = re.compile(r"^\s*<!--\s*not-run:\s*(.*?)\s*-->\s*$")


@dataclass
class Block:
    path: str          # as given (relative to the repository root for the real docs)
    line: int          # 1-based line of the opening fence
    language: str      # "python", "bash", or a display language
    code: str
    not_run: str | None = None   # the reason of a <!-- not-run: ... --> marker

    @property
    def runs(self):
        return self.language in ("python", "bash") and self.not_run is None

    @property
    def where(self):
        return f"{self.path}:{self.line}"


def parse_blocks(text, path="<doc>"):
    """The fenced code blocks of a markdown text, in order; ValueError on a fence without a
    language, an unknown language or an unclosed fence."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence, info = len(match.group(1)), match.group(2), match.group(3).lower()
        start = i
        body = []
        i += 1
        while i < len(lines) and not re.match(rf"^ {{0,3}}{fence}`*\s*$", lines[i]):
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        if i == len(lines):
            raise ValueError(f"{path}:{start + 1}: code fence is never closed")
        i += 1
        if not info:
            raise ValueError(f"{path}:{start + 1}: code fence without a language; use python, "
                             f"bash, or a display language {sorted(SHOW_LANGUAGES)}")
        language = RUN_LANGUAGES.get(info, info)
        if language not in ("python", "bash") and language not in SHOW_LANGUAGES:
            raise ValueError(f"{path}:{start + 1}: unknown code block language {info!r}; "
                             f"runnable: {sorted(RUN_LANGUAGES)}, display: "
                             f"{sorted(SHOW_LANGUAGES)}")
        not_run = None
        if start > 0:
            marker = _NOT_RUN.match(lines[start - 1])
            if marker:
                not_run = marker.group(1)
        blocks.append(Block(path, start + 1, language, "\n".join(body) + "\n", not_run))
    return blocks


def file_blocks(doc):
    return parse_blocks((ROOT / doc).read_text(), doc)


# ----- running ---------------------------------------------------------------------------------

def _workdir(parent):
    work = Path(tempfile.mkdtemp(dir=parent))
    for name in LINKED_DIRS:
        if (ROOT / name).is_dir():
            (work / name).symlink_to(ROOT / name, target_is_directory=True)
    return work


def _shell_env():
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env["POA_KERAS_REPO"] = str(ROOT)
    return env


def run_blocks(blocks, workdir, env=None):
    """Runs the runnable blocks of one file in order, in `workdir`; stops at the first failure.

    Returns {"error": None or text naming the block (file:line), "seconds": float,
    "cpu_seconds": float (this process only, not the shell commands), "blocks_run": int,
    "block_seconds": [(line, seconds)], "output": captured text}."""
    namespace = {"__name__": "__main__"}
    env = _shell_env() if env is None else env
    output = io.StringIO()
    start, cpu_start = time.perf_counter(), time.process_time()
    previous = os.getcwd()
    error, run, timings = None, 0, []
    os.chdir(workdir)
    try:
        for block in blocks:
            if not block.runs:
                if block.language == "json":
                    try:
                        json.loads(block.code)
                    except json.JSONDecodeError as e:
                        error = f"{block.where}: json block does not parse: {e}"
                        break
                continue
            run += 1
            t0 = time.perf_counter()
            if block.language == "python":
                try:
                    # padded so that tracebacks give the line numbers of the markdown file
                    code = compile("\n" * block.line + block.code, block.path, "exec")
                    with contextlib.redirect_stdout(output):
                        exec(code, namespace)  # noqa: S102 -- running the docs is the test
                except BaseException:  # noqa: BLE001 -- report anything, SystemExit included
                    error = f"{block.where}: python block failed:\n{traceback.format_exc()}"
                    break
            else:
                try:
                    proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block.code],
                                          cwd=workdir, env=env, capture_output=True, text=True,
                                          timeout=BLOCK_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    error = f"{block.where}: bash block ran over {BLOCK_TIMEOUT_S} s"
                    break
                output.write(proc.stdout)
                if proc.returncode != 0:
                    error = (f"{block.where}: bash block exited with {proc.returncode}\n"
                             f"--- stdout ---\n{proc.stdout[-4000:]}\n"
                             f"--- stderr ---\n{proc.stderr[-4000:]}")
                    break
            timings.append((block.line, round(time.perf_counter() - t0, 2)))
            output.write(f"[{block.where}: {timings[-1][1]:.1f} s]\n")
    finally:
        os.chdir(previous)
    return {"error": error, "seconds": time.perf_counter() - start,
            "cpu_seconds": time.process_time() - cpu_start, "blocks_run": run,
            "block_seconds": timings, "output": output.getvalue()[-6000:]}


def _main(argv):
    """Script mode: ``python test_docs.py RESULTS.json DOC...`` runs the docs into RESULTS."""
    out, docs = argv[0], argv[1:]
    blocks = {doc: file_blocks(doc) for doc in docs}
    if any(b.runs and b.language == "python" for bs in blocks.values() for b in bs):
        import keras  # noqa: F401 -- pins the backend before any block can set another one
        # Keras imports TensorFlow at the first get_config on every backend (dtype policy
        # serialisation): do it now, then freeze the heap, because keras' Layer.__delattr__
        # runs gc.collect() (once per Dense in model.quantize: 0.5 s each with TF loaded).
        import tensorflow  # noqa: F401
        gc.collect()
        gc.freeze()
    results = {}
    with tempfile.TemporaryDirectory(prefix="poa-keras-docs-") as tmp:
        for doc in docs:
            results[doc] = run_blocks(blocks[doc], _workdir(tmp))
            gc.collect()
            gc.freeze()
            Path(out).write_text(json.dumps(results, indent=1))   # partial results survive
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))


# ----- the tests -------------------------------------------------------------------------------

import pytest  # noqa: E402  (script mode needs no pytest)


def _backend():
    import keras
    return keras.backend.backend()


# Rough CPU seconds of a call on JAX (each compiles programs), to balance the runner processes.
_CALL_COSTS = {"POA(": 20.0, "pretrain(": 10.0, "DINO(": 8.0, ".fit(": 5.0, " sweep(": 5.0,
               "linear_probe(": 5.0, "compiled_forward": 2.0, "poa-keras ": 8.0}


def _cost(doc):
    """A rough run-time weight of a doc file for balancing the runner processes."""
    code = "".join(b.code for b in file_blocks(doc) if b.runs)
    return 1.0 + len(code) / 1000 + sum(code.count(c) * w for c, w in _CALL_COSTS.items())


@pytest.fixture(scope="session")
def doc_results(request, tmp_path_factory):
    """Runs every selected doc file once per session, in concurrent runner subprocesses."""
    selected = sorted({item.callspec.params["doc"] for item in request.session.items
                       if getattr(item, "originalname", None) == "test_doc_code_blocks_run"
                       and Path(str(getattr(item, "path", ""))) == Path(__file__)})
    groups = {f"python{i}": [] for i in range(PYTHON_PROCESSES)}
    groups["shell"] = []
    load = dict.fromkeys(groups, 0.0)
    for doc in sorted(selected, key=_cost, reverse=True):   # heaviest first, to the lightest
        blocks = file_blocks(doc)
        if any(b.runs and b.language == "python" for b in blocks):
            name = min((g for g in groups if g.startswith("python")), key=load.get)
        elif any(b.runs for b in blocks) and _backend() in SHELL_DOC_BACKENDS:
            name = "shell"
        else:
            continue
        groups[name].append(doc)
        load[name] += _cost(doc)
    env = dict(os.environ, KERAS_BACKEND=_backend(), TF_CPP_MIN_LOG_LEVEL="3",
               MPLBACKEND="Agg")
    env.setdefault("OMP_NUM_THREADS", "1")
    tmp = tmp_path_factory.mktemp("docs")
    procs = {}
    for name, docs in groups.items():
        if docs:
            out = tmp / f"{name}.json"
            log = open(tmp / f"{name}.log", "w")
            procs[name] = (subprocess.Popen([sys.executable, __file__, str(out), *docs],
                                            cwd=ROOT, env=env, stdout=log,
                                            stderr=subprocess.STDOUT), out, log, docs)
    results = {}
    for name, (proc, out, log, docs) in procs.items():
        try:
            proc.wait(timeout=1800)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        found = json.loads(out.read_text()) if out.exists() else {}
        tail = (tmp / f"{name}.log").read_text()[-4000:]
        for doc in docs:
            results[doc] = found.get(doc) or {
                "error": f"{doc}: the doc runner (exit code {proc.returncode}) stopped "
                         f"before it finished this file; its log ends with:\n{tail}",
                "seconds": 0.0, "cpu_seconds": 0.0, "blocks_run": 0, "output": ""}
    return results


# Shell-only pages (docs/cli.md: a dozen `poa-keras` processes, ~10 s of imports each) run on
# the torch backend only, which starts and runs them fastest: the commands are the same Python
# on every backend, and tests/test_cli.py runs every sub-command on every backend.
SHELL_DOC_BACKENDS = ("torch",)


@pytest.mark.parametrize("doc", DOC_FILES)
def test_doc_code_blocks_run(doc, doc_results):
    blocks = file_blocks(doc)
    if not any(b.runs for b in blocks):
        pytest.skip(f"{doc} has no runnable code blocks")
    if (not any(b.runs and b.language == "python" for b in blocks)
            and _backend() not in SHELL_DOC_BACKENDS):
        pytest.skip(f"{doc} holds shell commands only: run on {SHELL_DOC_BACKENDS} (CI time); "
                    "tests/test_cli.py runs every sub-command on this backend")
    result = doc_results[doc]
    if result["error"] is not None:
        pytest.fail(result["error"] + "\n--- output ---\n" + result["output"], pytrace=False)
    assert result["blocks_run"] == sum(b.runs for b in blocks)
    slowest = sorted(result.get("block_seconds", []), key=lambda t: -t[1])[:3]
    print(f"{doc}: {result['blocks_run']} blocks in {result['seconds']:.1f} s "
          f"({result.get('cpu_seconds', 0.0):.1f} s CPU in the runner); slowest (line, s): "
          f"{slowest}")


def test_skipped_blocks_are_rare_and_justified():
    skipped = [b for doc in DOC_FILES for b in file_blocks(doc) if b.not_run is not None]
    for block in skipped:
        assert block.language in ("python", "bash"), \
            f"{block.where}: a not-run marker on a {block.language} block (it never runs anyway)"
        assert len(block.not_run) >= 10, f"{block.where}: say why the block does not run"
    assert len(skipped) <= MAX_NOT_RUN, \
        f"{len(skipped)} blocks are marked not-run: {[b.where for b in skipped]}"


def test_json_blocks_parse():
    for doc in DOC_FILES:
        for block in file_blocks(doc):
            if block.language == "json":
                try:
                    json.loads(block.code)
                except json.JSONDecodeError as error:
                    pytest.fail(f"{block.where}: json block does not parse: {error}")


def test_every_doc_page_is_linked_from_the_index():
    index = (ROOT / "docs" / "index.md").read_text()
    for doc in DOC_FILES:
        name = Path(doc).name
        if doc.startswith("docs/") and name != "index.md":
            assert f"({name})" in index, f"docs/index.md does not link {name}"


def test_parser_languages_markers_and_errors():
    text = ("x\n<!-- not-run: needs ImageNet -->\n```bash\npoa-keras pretrain\n```\n"
            "```python\na = 1\n```\n  ```text\n  shown\n  ```\n````markdown\n```python\n````\n")
    blocks = parse_blocks(text, "t.md")
    assert [(b.line, b.language, b.runs) for b in blocks] == [
        (3, "bash", False), (6, "python", True), (9, "text", False), (12, "markdown", False)]
    assert blocks[0].not_run == "needs ImageNet"
    assert blocks[2].code == "shown\n" and blocks[3].code == "```python\n"
    for bad, message in (("```\nx\n```\n", "without a language"),
                         ("```rust\nx\n```\n", "unknown code block language"),
                         ("```python\nx\n", "never closed")):
        with pytest.raises(ValueError, match=message):
            parse_blocks(bad, "bad.md")


def test_a_failing_block_fails_with_its_file_and_line(tmp_path):
    text = ("```python\nvalue = 41\n```\n\n```python\nvalue += 1\nassert value == 43, value\n"
            "```\n\n```python\nnever = True\n```\n")
    result = run_blocks(parse_blocks(text, "fail.md"), tmp_path)
    assert result["error"].startswith("fail.md:5: python block failed")
    assert "AssertionError: 42" in result["error"] and result["blocks_run"] == 2
    assert 'File "fail.md", line 7' in result["error"]   # the markdown file's own line

    text = ("```python\nopen('made.txt', 'w').write('x')\n```\n"
            "```bash\ntest -f made.txt\necho $POA_KERAS_REPO\nfalse | cat\n```\n")
    result = run_blocks(parse_blocks(text, "sh.md"), tmp_path)
    assert result["error"].startswith("sh.md:4: bash block exited with 1"), result["error"]
    assert str(ROOT) in result["output"]   # python and bash share the directory and order

    result = run_blocks(parse_blocks('```json\n{"a": 1,}\n```\n', "j.md"), tmp_path)
    assert result["error"].startswith("j.md:1: json block does not parse")
