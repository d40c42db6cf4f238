"""A harvest store on bad days (BAD_INPUTS rows 31-36): folders oculi did not create are never
deleted, one writer per store (a real second process), writes under a file-size limit, tampered
stores refused or redone (each kind of tampering), torn unit logs after a real SIGKILL at chosen
moments, float16 overflow warnings, and one-line CLI errors naming the file."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import oculi
from models import tiny_model, tiny_tokenizer
from oculi.harvest import HarvestStoreError, LocalExecutor
from oculi.harvest.lock import HarvestLockedError, StoreLock
from test_harvest import SMALL, word_prompts

pytest.importorskip("zarr")
pytest.importorskip("pyarrow")

TESTS = Path(__file__).parent
KW = dict(sites=["resid_post"], layers=[0, 1], **SMALL)  # 50 prompts: 401 tokens, 7 units
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def adapter():
    return oculi.attach(tiny_model("gemma3"), tiny_tokenizer())


@pytest.fixture(scope="module")
def reference(adapter, tmp_path_factory):
    """An untouched store of 50 prompts, and its arrays read back."""
    out = tmp_path_factory.mktemp("ref") / "store"
    oculi.harvest(adapter, word_prompts(50), out=out, **KW)
    store = oculi.open_harvest(out)
    return out, {key: np.asarray(store[key]) for key in store.keys}


def same_as(out: Path, arrays: dict) -> None:
    store = oculi.open_harvest(out, verify=True)
    assert store.complete and sorted(store.keys) == sorted(arrays)
    for key, want in arrays.items():
        np.testing.assert_array_equal(np.asarray(store[key]), want)


def listing(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# --- 1. a folder oculi did not create is never deleted (row 31) ---------------------------


def users_folder(root: Path) -> dict[str, bytes]:
    (root / "sub").mkdir(parents=True)
    (root / "manifest.json").write_text('{"my": "own manifest"}')
    (root / "notes.txt").write_text("three years of notes")
    (root / "sub" / "data.bin").write_bytes(os.urandom(64))
    return listing(root)


@pytest.mark.parametrize("resume", [False, True])
def test_a_folder_oculi_did_not_create_is_refused_and_untouched(adapter, tmp_path, resume):
    before = users_folder(tmp_path / "mine")
    with pytest.raises(HarvestStoreError, match=r"not an oculi harvest store \(no oculi-harvest"):
        oculi.harvest(adapter, word_prompts(5), out=tmp_path / "mine", resume=resume, **KW)
    assert listing(tmp_path / "mine") == before  # not even a lock file was written into it


def test_replacing_a_store_refuses_files_oculi_did_not_write(adapter, reference, tmp_path):
    out = tmp_path / "store"
    shutil.copytree(reference[0], out)
    (out / "resid_post" / "1" / "my_plot.png").write_bytes(b"png")
    (out / "resid_post" / "0" / "c" / "link").symlink_to(tmp_path)
    before = listing(out)
    with pytest.raises(HarvestStoreError, match=r"files oculi did not write \(resid_post/0/c/link, "
                       r"resid_post/1/my_plot.png\)"):  # fmt: skip
        oculi.harvest(adapter, word_prompts(50), out=out, resume=False, **KW)
    after = listing(out)
    after.pop("oculi-harvest.lock"), before.pop("oculi-harvest.lock")
    assert after == before
    (out / "resid_post" / "1" / "my_plot.png").unlink()
    (out / "resid_post" / "0" / "c" / "link").unlink()
    # a genuine store holding only oculi's files is replaced (other layers: a new layout)
    fresh = oculi.harvest(adapter, word_prompts(50), out=out, resume=False,
                          **{**KW, "layers": [2]})  # fmt: skip
    assert fresh.units_computed == fresh.units
    assert sorted(p.name for p in (out / "resid_post").iterdir()) == ["2", "zarr.json"]
    ref = adapter.capture_residual(word_prompts(50)[7], oculi.ResidualConfig(layers=[2]))
    store = oculi.open_harvest(out)
    np.testing.assert_allclose(store["resid_post", 2][store.rows_of(prompt_ids=[7])],
                               ref.post_mlp[0].numpy(), atol=1e-5)  # fmt: skip


def test_cli_no_resume_into_a_users_folder_is_refused(tmp_path):
    from oculi.cli import cli

    model = tmp_path / "model"
    tiny_model("llama_gqa").save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in word_prompts(5)))
    before = users_folder(tmp_path / "mine")
    res = CliRunner().invoke(cli, ["harvest", "--prompts", str(prompts), "--sites", "resid_post",
                                   "--layers", "0", "--out", str(tmp_path / "mine"), "--model",
                                   str(model), "--device", "cpu", "--quiet", "--no-resume"])  # fmt: skip
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and f"'{tmp_path / 'mine'}' exists and is not an oculi" in lines[0]
    assert listing(tmp_path / "mine") == before


# --- 2. one writer per store (row 32) ------------------------------------------------------

_SLOW_RUN = """
import sys, time, json
sys.path.insert(0, {tests!r})
from models import tiny_model, tiny_tokenizer
import oculi
from test_harvest import word_prompts
ad = oculi.attach(tiny_model("gemma3"), tiny_tokenizer())
ad.layer_modules[0].register_forward_pre_hook(lambda *a: time.sleep(0.15))
s = oculi.harvest(ad, word_prompts(50), out={out!r}, sites=["resid_post"], layers=[0, 1],
                  chunk_rows=16, unit_rows=64, batch_tokens=64, progress=False)
print(json.dumps([s.units_computed, s.units]))
"""


def test_a_second_harvest_is_refused_while_one_runs(adapter, reference, tmp_path):
    out = tmp_path / "store"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_RUN.format(tests=str(TESTS), out=str(out))],
                            env=ENV, stdout=subprocess.PIPE, text=True)  # fmt: skip
    lock = out / "oculi-harvest.lock"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if lock.exists() and str(proc.pid) in lock.read_text() and (out / "units.jsonl").exists():
            break
        time.sleep(0.02)
    holder = rf"pid {proc.pid} on host {socket.gethostname()}"
    try:
        for resume, executor in ((True, "local"), (False, "local"), (False, "ray")):
            with pytest.raises(HarvestLockedError, match=holder):
                oculi.harvest(adapter, word_prompts(50), out=out, resume=resume,
                              executor=executor, **KW)  # fmt: skip
        assert proc.poll() is None, "the first harvest must still be running"
    finally:
        stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and json.loads(stdout) == [7, 7]  # nothing removed under it
    assert lock.read_text() == ""  # released
    store = oculi.open_harvest(out, verify=True)
    for key, want in reference[1].items():
        np.testing.assert_allclose(np.asarray(store[key]), want, atol=1e-6)


_DIE_HOLDING_THE_LOCK = """
import os, signal, sys
from oculi.harvest.lock import StoreLock
StoreLock({out!r}).acquire()
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_the_lock_of_a_killed_process_is_stale_and_taken(adapter, reference, tmp_path):
    out = tmp_path / "store"
    out.mkdir()
    proc = subprocess.run([sys.executable, "-c", _DIE_HOLDING_THE_LOCK.format(out=str(out))],
                          env=ENV)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL
    stale = json.loads((out / "oculi-harvest.lock").read_text())
    assert stale["host"] == socket.gethostname() and stale["pid"] != os.getpid()
    done = oculi.harvest(adapter, word_prompts(50), out=out, **KW)
    assert done.units_computed == done.units
    assert (out / "oculi-harvest.lock").read_text() == ""
    same_as(out, reference[1])


@pytest.mark.parametrize("exc", [RuntimeError("node lost"), KeyboardInterrupt()])
def test_the_lock_is_released_on_any_exit(adapter, tmp_path, exc):
    class Failing(LocalExecutor):
        def run(self, *args):
            raise exc

    with pytest.raises(type(exc)):
        oculi.harvest(adapter, word_prompts(20), out=tmp_path, executor=Failing(), **KW)
    with StoreLock(tmp_path) as lock:  # free again
        assert lock.held
        with pytest.raises(HarvestLockedError, match=f"pid {os.getpid()}"):
            StoreLock(tmp_path).acquire()  # a second holder, even in this process, is refused


# --- 3. writes under a file-size limit (row 33) ---------------------------------------------

_LIMITED_RUN = """
import json, os, resource, sys
sys.path.insert(0, {tests!r})
from models import tiny_model, tiny_tokenizer
import oculi
from test_harvest import word_prompts
ad = oculi.attach(tiny_model("gemma3"), tiny_tokenizer())
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
try:
    oculi.harvest(ad, word_prompts({n}), out={out!r}, sites=["resid_post"], layers=[0, 1],
                  chunk_rows=16, unit_rows={unit_rows}, batch_tokens=64, progress=False)
    print(json.dumps(["ok", ""]))
except Exception as exc:
    print(json.dumps([type(exc).__name__, str(exc)]))
"""


def limited_run(out: Path, limit: int, n: int = 50, unit_rows: int = 64) -> tuple[str, str]:
    script = _LIMITED_RUN.format(tests=str(TESTS), out=str(out), limit=limit, n=n,
                                 unit_rows=unit_rows)  # fmt: skip
    run = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    return tuple(json.loads(run.stdout.strip().splitlines()[-1]))  # type: ignore[return-value]


def test_file_size_limit_on_the_index_then_resume_completes(adapter, reference, tmp_path):
    out = tmp_path / "store"
    assert (reference[0] / "index.parquet").stat().st_size > 2000  # every earlier file is smaller
    kind, msg = limited_run(out, 2000)
    assert kind == "FileWriteError" and f"'{out / 'index.parquet'}'" in msg
    assert "File too large" in msg
    assert not (out / "index.parquet").exists() and not (out / "manifest.json").exists()
    assert not [p for p in out.iterdir() if p.suffix == ".tmp"]
    done = oculi.harvest(adapter, word_prompts(50), out=out, **KW)  # killed before the manifest
    assert done.units_computed == done.units
    same_as(out, reference[1])


def test_file_size_limit_on_a_shard_names_array_unit_and_file(adapter, reference, tmp_path):
    out = tmp_path / "store"
    kind, msg = limited_run(out, 4000)  # index 2.6 kB, manifest 1.3 kB, shards 16 kB
    shard = out / "resid_post" / "0" / "c" / "0" / "0"
    assert kind == "FileWriteError"
    assert f"cannot write array 'resid_post/0', unit 0 to '{shard}': File too large" in msg
    assert not shard.exists()
    done = oculi.harvest(adapter, word_prompts(50), out=out, **KW)
    assert done.units_computed == done.units
    same_as(out, reference[1])


def test_file_size_limit_on_the_unit_log_keeps_every_commit(adapter, tmp_path):
    out, kw = tmp_path / "store", {**KW, "unit_rows": 16}
    clean = tmp_path / "clean"
    oculi.harvest(adapter, word_prompts(200), out=clean, **kw)  # 1421 tokens, 89 units
    others = max(
        p.stat().st_size for p in clean.rglob("*") if p.is_file() and p.name != "units.jsonl"
    )
    limit = others + 1000
    assert (clean / "units.jsonl").stat().st_size > limit + 1000
    kind, msg = limited_run(out, limit, n=200, unit_rows=16)
    assert kind == "FileWriteError" and f"to '{out / 'units.jsonl'}': File too large" in msg
    log = (out / "units.jsonl").read_bytes()
    assert log.endswith(b"\n") and limit - 400 < len(log) <= limit  # the failed line was undone
    units = [json.loads(line)["unit"] for line in log.splitlines()]
    assert units == list(range(len(units)))
    done = oculi.harvest(adapter, word_prompts(200), out=out, **kw)
    assert done.units_computed == done.units - len(units)
    ref = oculi.open_harvest(clean)
    store = oculi.open_harvest(out, verify=True)
    for key in ref.keys:
        np.testing.assert_array_equal(np.asarray(store[key]), np.asarray(ref[key]))


def test_file_size_limit_while_rewriting_a_damaged_index_keeps_the_rest(
    adapter, reference, tmp_path
):
    out = tmp_path / "store"
    shutil.copytree(reference[0], out)
    (out / "index.parquet").write_bytes(b"not parquet")
    manifest = (out / "manifest.json").read_bytes()
    kind, msg = limited_run(out, 2000)
    assert kind == "FileWriteError" and f"'{out / 'index.parquet'}'" in msg
    assert "File too large" in msg
    assert (out / "index.parquet").read_bytes() == b"not parquet"  # the previous file, whole
    assert (out / "manifest.json").read_bytes() == manifest
    again = oculi.harvest(adapter, word_prompts(50), out=out, **KW)
    assert again.units_computed == 0  # the index is rewritten, no unit is redone
    same_as(out, reference[1])
    assert oculi.open_harvest(out).index.equals(oculi.open_harvest(reference[0]).index)
