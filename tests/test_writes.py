"""Every file oculi writes is written whole or not at all (BAD_INPUTS row 33).

Each writer runs in a child process under a file-size limit (``RLIMIT_FSIZE``, ``SIGXFSZ``
ignored, as ``ulimit -f`` does) over an existing good file. Afterwards the folder must be byte
for byte what it was (the old file intact, no temporary file left), and the error must be
oculi's ``FileWriteError`` (an ``OSError``), naming the path the caller gave. The same writer
without the limit writes more than the limit, so no case passes by writing nothing.

One child per writer, forked from a process that prepared every payload once (torch, the tiny
model, a capture, records, a figure), so a crash in one writer (h5py...) fails only its case.

The last test keeps new writers honest: any raw write call in ``src/`` (``open(.., "w")``,
``write_text``, ``torch.save``, ``np.savez``, ``savefig``, ``to_parquet``, ``os.replace``...)
outside ``oculi.capture.io.files`` must be on an explicit allow-list saying why it is safe.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

LIMIT = 4096  # bytes: every payload below is larger
PROMPT = "the eiffel tower is in the city of"
OLD = b"the previous good file\n"
RUN = "logit_lens"

CASES = {
    # name: the target, relative to the case's folder
    "capture-safetensors": "out.safetensors",
    "capture-npz": "out.npz",
    "capture-hdf5": "out.h5",
    "capture-json": "out.json",
    "capture-pickle": "out.pkl",
    "records-safetensors": "acts.safetensors",
    "records-npz": "acts.npz",
    "records-pt": "acts.pt",
    "records-json": "acts.json",
    "records-pickle": "acts.pkl",
    "report": "report.html",
    "figure-png": "fig.png",
    "figure-svg": "fig.svg",
    "analyzer-plot": "plot.png",
    "experiment-run": f"outputs/{RUN}/first",
    "model-cache": "cache/model",
    "cli-report": "cli.html",
    "cli-run": f"cli-outputs/{RUN}/first",
}


# -- the child side: run as `python tests/test_writes.py FOLDER` ---------------------------
def _prepare(root: Path) -> dict:
    """Everything the writers need, built before any limit is set."""
    import matplotlib

    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt
    import torch

    import oculi
    from models import tiny_model, tiny_tokenizer
    from oculi.analyzer import ModelAnalyzer

    adapter = oculi.attach(tiny_model("gemma3"), tiny_tokenizer())
    fig = plt.figure()
    plt.plot(torch.randn(2000).cumsum(0).tolist())
    fig.savefig(io.BytesIO(), format="png")  # font caches warmed: nothing written later
    fig.savefig(io.BytesIO(), format="svg")
    model_dir = root / "tiny-model"
    adapter.model.save_pretrained(model_dir)
    adapter.tokenizer.save_pretrained(model_dir)
    analyzer = ModelAnalyzer(adapter=adapter)
    prompts = [PROMPT, PROMPT + " paris", "the cat sat on the mat", "a dog ran in the park"] * 2
    records = analyzer.extract_batch_activations(prompts, return_logits=True)
    config = root / "lens.yaml"
    config.write_text(f"prompt: {PROMPT}\ntarget: paris\n")
    return {
        "adapter": adapter,
        "analyzer": analyzer,
        "full": adapter.capture_full(PROMPT),
        "records": records,
        "fig": fig,
        "model_dir": model_dir,
        "config": config,
    }


class CliFailed(Exception):
    """The command ended with a non-zero status; the message holds it and the output."""


def _writer(name: str, p: dict):
    """``write(target)`` for the case ``name``."""
    from click.testing import CliRunner

    from oculi.analyzer.records import save_records
    from oculi.capture.io.save import save_capture
    from oculi.cli import cli
    from oculi.experiments import run_experiment
    from oculi.models.loading import _ensure_cached
    from oculi.visualize._common import save_figure
    from oculi.visualize.report import write_report

    kind, _, fmt = name.partition("-")
    if kind == "capture":
        return lambda t: save_capture(p["full"], t, format=fmt)
    if kind == "records":
        return lambda t: save_records(p["records"], t)
    if kind == "figure":
        return lambda t: save_figure(p["fig"], t)
    if name == "report":
        return lambda t: write_report(p["adapter"], PROMPT, t, samples=1)
    if name == "analyzer-plot":
        return lambda t: p["analyzer"].plot_convergence(PROMPT, save_path=t)
    if name == "experiment-run":
        out = lambda t: t.parent.parent  # noqa: E731
        return lambda t: run_experiment(
            RUN, p["config"], adapter=p["adapter"], tag=t.name, out_dir=out(t), overwrite=True,
            parity=False,
        )  # fmt: skip

    if name == "model-cache":

        def build(folder: Path) -> None:  # what a conversion writes: a large weights file
            with open(folder / "model.safetensors", "wb") as fh:
                fh.write(os.urandom(4 * LIMIT))

        return lambda t: _ensure_cached(t, build)

    def cli_call(args: list[str]) -> None:
        result = CliRunner().invoke(cli, args)
        if result.exit_code != 0:
            raise CliFailed(f"exit {result.exit_code}: {result.output.strip()}")

    model = ["-m", str(p["model_dir"]), "--device", "cpu"]
    if name == "cli-report":
        return lambda t: cli_call(["report", PROMPT, "-o", str(t), "--samples", "1", *model])
    assert name == "cli-run"
    return lambda t: cli_call(
        ["run", RUN, "-c", str(p["config"]), "--tag", t.name, "--out", str(t.parent.parent),
         "--overwrite", "--no-parity", *model]
    )  # fmt: skip


def _old_state(target: Path) -> None:
    """The good file (or run folder, or cache lock) that a failed write must leave alone."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if "outputs/" in str(target):  # a finished run oculi wrote earlier
        target.mkdir()
        (target / "result.json").write_bytes(OLD)
        (target / "config.yaml").write_bytes(OLD)
    elif target.parent.name == "cache":  # the cache's lock file exists once a build ran
        (target.parent / f".{target.name}.lock").touch()
    else:
        target.write_bytes(OLD)


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): (p.read_bytes().hex() if p.is_file() else "<dir>")
        for p in sorted(folder.rglob("*"))
    }


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.exists() else 0


def _run_child(write, target: Path) -> dict:
    """Fork; the child sets the limit and writes; the parent reads what it raised."""
    import resource
    import signal

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report through the pipe (a pipe is not limited), then _exit
        os.close(r)
        out: dict = {"raised": None}
        try:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            import faulthandler  # a writer that hangs: its stacks on stderr, the child ends

            faulthandler.dump_traceback_later(240, exit=True)
            resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))
            write(target)
        except BaseException as exc:  # noqa: BLE001 - reported to the parent as it is
            out = {
                "raised": type(exc).__name__,
                "oserror": isinstance(exc, OSError),
                "oculi": type(exc).__module__.startswith("oculi"),
                "message": str(exc),
            }
        os.write(w, json.dumps(out).encode())
        os.close(w)
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 1 << 16):
        data += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    result = json.loads(data) if data else {}
    result["status"] = status
    return result


def main(root: Path) -> None:
    prepared = _prepare(root)
    results = {}
    for name, rel in CASES.items():
        write = _writer(name, prepared)
        free = root / "free" / name / rel  # the same write without a limit: its size
        free.parent.mkdir(parents=True, exist_ok=True)
        write(free)
        case = root / "cases" / name
        target = case / rel
        _old_state(target)
        before = _snapshot(case)
        result = _run_child(write, target)
        result.update(size=_size(free), same=_snapshot(case) == before, target=str(target))
        results[name] = result
    print(json.dumps(results))


# -- the test side ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("writes")
    import oculi

    src = str(Path(oculi.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, str(Path(__file__).parent)])}
    # forked children: no tokenizer thread pool to inherit mid-lock
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.update(OCULI_CACHE=str(root / "oculi-cache"))
    done = subprocess.run(
        [sys.executable, __file__, str(root)], capture_output=True, text=True, env=env,
        timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(CASES))
def test_a_write_stopped_by_the_size_limit_leaves_the_old_file(outcomes, name):
    out = outcomes[name]
    assert out["size"] > LIMIT  # unlimited, this writer writes more than the limit
    assert out["status"] == 0  # the child ended normally: no crash inside a library
    assert out["same"], "the folder changed: the old file was damaged or a temp file was left"
    assert out["raised"] is not None, "the write did not fail under the limit"
    message = out["message"]
    if name.startswith("cli-"):  # one line on stderr, exit status 2 (a bad input)
        assert out["raised"] == "CliFailed" and message.startswith("exit 2: "), message
        lines = message.removeprefix("exit 2: ").splitlines()
        assert len(lines) == 1 and lines[0].startswith("oculi: error: "), message
    else:  # FileWriteError / ModelLoadError, both OSErrors
        assert out["oserror"] and out["oculi"], out
        assert out["raised"] in ("FileWriteError", "ModelLoadError"), out
    assert "File too large" in message, message
    shown = "cache/model" if name == "model-cache" else CASES[name]
    assert shown in message, message  # names the path the caller gave
    assert ".tmp" not in message  # never the temporary file


# -- no raw write outside the helper ---------------------------------------------------------
RAW_WRITE = re.compile(
    r"""open\([^)]*["'][wax]b?\+?["']|\.open\(\s*["'][wax]|\.write_text\(|\.write_bytes\("""
    r"""|np\.save|torch\.save\(|savefig\(|to_parquet\(|write_table\(|save_file\("""
    r"""|pickle\.dump\(|json\.dump\(|yaml\.(safe_)?dump\([^,()]+,\s*\w+\s*[,)]|save_pretrained\("""
    r"""|os\.replace\(|os\.rename\(|shutil\.(move|copy)|h5py\.File\("""
)
SRC = Path(__file__).resolve().parents[1] / "src" / "oculi"
# a raw write into the temporary file write_atomically hands its callback (named tmp, t, or fh
# for the file opened on it), in a module that calls write_atomically or in capture/io (the
# format writers save_capture hands to it): the helper renames it into place
TO_THE_TEMP = re.compile(r"([(,]\s*(str\()?(tmp|t|fh)\b|\btmp\.(write_|open))")
# (file, what the line contains) -> why it is safe
ALLOWED = {
    ("capture/io/files.py", "os.replace(tmp, real)"): "the helper itself",
    ("capture/io/files.py", 'write_atomically("out.pt", lambda tmp'): "a docstring example",
    ("capture/io/hdf5_format.py", "h5py.File("): "opens write_atomically's temp file",
    ("capture/io/pickle_format.py", "(plain, or inside a ``torch.save`` zip)"): "a docstring",
    ("visualize/_common.py", '"""``fig.savefig(path, **kwargs)``'): "a docstring",
    ("visualize/views.py", "fig.savefig(buf,"): "into memory (an inline SVG)",
    ("experiments/runner.py", "os.rename("): "renames the whole run folder, written and "
    "fsync-ed in a temporary folder, into place (the old run moved aside first)",
    ("models/loading.py", "os.rename(tmp, target)"): "renames the fsync-ed cache folder",
    ("models/loading.py", "save_pretrained(folder)"): "writes the cache's temporary folder",
    ("models/loading.py", 'open(target.parent / f".{target.name}.lock", "a+")'): "a lock file",
    ("capture/io/folder.py", 'open(path, "wb")'): "a site file created in the hidden folder "
    "of a capture being streamed (stream_to=); the whole folder is renamed into place",
    ("capture/io/folder.py", "os.rename(real, old)"): "moves the old oculi capture folder "
    "aside, then the complete new one is renamed into place",
}
# the harvest store (another module's owner): zarr chunks, the append-only unit log (repaired
# on open) and its own temp-and-rename files
ALLOWED_FOLDERS = ("harvest/",)


def _raw_writes() -> list[str]:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        rel = str(path.relative_to(SRC))
        if rel.startswith(ALLOWED_FOLDERS):
            continue
        text = path.read_text(encoding="utf-8")
        helper = "write_atomically" in text or rel.startswith("capture/io/")
        for number, line in enumerate(text.splitlines(), 1):
            if not RAW_WRITE.search(line):
                continue
            if helper and TO_THE_TEMP.search(line):
                continue
            if any(f == rel and part in line for f, part in ALLOWED):
                continue
            found.append(f"src/oculi/{rel}:{number}: {line.strip()}")
    return found


def test_no_raw_write_outside_the_atomic_helper():
    found = _raw_writes()
    assert not found, (
        "raw writes outside oculi.capture.io.files.write_atomically (use it, or add the line "
        "to ALLOWED with the reason it is safe):\n" + "\n".join(found)
    )


def test_the_guard_sees_raw_writes():
    for line in ['open(path, "w")', "p.write_text(s)", "torch.save(x, f)", "fig.savefig(p)",
                 "np.savez(f, a=a)", "df.to_parquet(p)", "os.replace(a, b)",
                 'path.open("a", encoding="utf-8")', "json.dump(d, fh)",
                 "yaml.safe_dump(cfg, fh)"]:  # fmt: skip
        assert RAW_WRITE.search(line), line
    for line in ['open(path, "rb")', "path.read_text()", "json.dumps(d)", 'path.open("r")',
                 "yaml.safe_dump(cfg, sort_keys=False)"]:  # fmt: skip
        assert not RAW_WRITE.search(line), line
    for line in ["path.write_text(s)", "torch.save(x, out)", 'open(path, "wb")']:
        assert not TO_THE_TEMP.search(line), line  # not the helper's temp: still refused


if __name__ == "__main__":
    main(Path(sys.argv[1]))
