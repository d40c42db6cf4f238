"""A harvest store on bad days (BAD_INPUTS rows 31-36): folders oculi did not create are never
deleted, one writer per store (a real second process), writes under a file-size limit, tampered
stores refused or redone (each kind of tampering), torn unit logs after a real SIGKILL at chosen
moments, float16 overflow warnings, and one-line CLI errors naming the file."""

from __future__ import annotations

import copy
import json
import os
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import oculi
from models import tiny_model, tiny_tokenizer
from oculi.harvest import HarvestLockedError, HarvestStoreError, LocalExecutor
from oculi.harvest.lock import StoreLock
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
ad.layer_modules[0].register_forward_pre_hook(lambda *a: time.sleep(0.5))
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


# --- 6. open checks what it serves; resume redoes or refuses (row 35) -----------------------


def _swap(a: Path, b: Path) -> None:
    tmp = a.with_name(a.name + ".swap")
    a.rename(tmp), b.rename(a), tmp.rename(b)


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _reordered_index(root: Path) -> None:
    import pyarrow.parquet as pq

    table = pq.read_table(root / "index.parquet")
    pq.write_table(table.take(np.roll(np.arange(len(table)), 1)), root / "index.parquet")


def _other_index(root: Path) -> None:
    import pyarrow.parquet as pq

    table = pq.read_table(root / "index.parquet")
    pq.write_table(table.slice(0, len(table) - 3), root / "index.parquet")


SHARD = "resid_post/1/c/2/0"
TAMPERING = {
    # name: (tamper, what open names, open needs verify=True, resume: units redone or "refuse")
    "deleted shard": (
        lambda r: (r / SHARD).unlink(),
        ["array 'resid_post/1', unit 2: shard file", SHARD, "is missing (its rows would read as zeros)"],
        False, 1,
    ),
    "truncated shard": (
        lambda r: (r / SHARD).write_bytes((r / SHARD).read_bytes()[:-40]),
        ["array 'resid_post/1', unit 2: shard file", SHARD, "units.jsonl:"],
        False, 1,
    ),
    "shards swapped between units": (
        lambda r: _swap(r / "resid_post/1/c/1/0", r / SHARD),
        ["array 'resid_post/1', unit 1: shard file", "resid_post/1/c/1/0", "other rows than were written"],
        True, 2,
    ),
    "a flipped byte": (
        lambda r: (r / SHARD).write_bytes(
            (r / SHARD).read_bytes()[:99] + bytes([(r / SHARD).read_bytes()[99] ^ 1])
            + (r / SHARD).read_bytes()[100:]
        ),
        ["array 'resid_post/1', unit 2: shard file", SHARD], True, 1,
    ),
    "deleted index": (
        lambda r: (r / "index.parquet").unlink(),
        ["index.parquet' is missing"], False, 0,
    ),
    "index of another length": (
        _other_index, ["index.parquet' has 398 rows, the store 401 tokens"], False, 0,
    ),
    "index in another order": (
        _reordered_index, ["index.parquet' is not the one written with the store"], False, 0,
    ),
    "edited n_tokens": (
        lambda r: _edit_json(r / "manifest.json", lambda m: m["tokens"].update(n_tokens=400)),
        ["array 'resid_post/0':", "resid_post/0/zarr.json' says shape (401, 64)", "(400, 64)"],
        False, "refuse",
    ),
    "swapped array folders": (
        lambda r: _swap(r / "resid_post/0", r / "resid_post/1"),
        ["array 'resid_post/0':", "resid_post/0/zarr.json' says layer 1", "manifest.json' 0"],
        False, "refuse",
    ),
    "edited dtype": (
        lambda r: _edit_json(r / "resid_post/1/zarr.json", lambda m: m.update(data_type="float16")),
        ["array 'resid_post/1':", "resid_post/1/zarr.json' says dtype 'float16'", "'float32'"],
        False, "refuse",
    ),
    "a log line without unit": (
        lambda r: (r / "units.jsonl").open("a").write('{"rows": [0, 64]}\n'),
        ["units.jsonl:8 is not a unit record: it lacks 'unit'"], False, "refuse",
    ),
    "a non-JSON manifest": (
        lambda r: (r / "manifest.json").write_text("{oops"),
        ["the harvest manifest '", "manifest.json' is not valid JSON"], False, "refuse",
    ),
}  # fmt: skip


@pytest.mark.parametrize("kind", list(TAMPERING))
def test_open_refuses_a_tampered_store_and_resume_redoes_or_refuses(
    adapter, reference, tmp_path, kind
):
    tamper, names, needs_verify, resume = TAMPERING[kind]
    out = tmp_path / "store"
    shutil.copytree(reference[0], out)
    tamper(out)
    if needs_verify:  # same-size damage: only content checksums see it
        oculi.open_harvest(out)
    with pytest.raises(HarvestStoreError) as err:
        oculi.open_harvest(out, verify=True)
    message = str(err.value)
    assert "\n" not in message
    for name in names:
        assert name in message
    if resume == "refuse":
        with pytest.raises(HarvestStoreError) as again:
            oculi.harvest(adapter, word_prompts(50), out=out, **KW)
        assert names[-1] in str(again.value) or "n_tokens: stored 400, now 401" in str(again.value)
        redo = oculi.harvest(adapter, word_prompts(50), out=out, resume=False, **KW)
        assert redo.units_computed == redo.units
    else:
        redo = oculi.harvest(adapter, word_prompts(50), out=out, verify=needs_verify, **KW)
        assert redo.units_computed == resume
    same_as(out, reference[1])
    assert listing(out)["index.parquet"] == listing(reference[0])["index.parquet"]


# --- 7. killed at chosen moments: torn log lines, no manifest yet (row 36) ------------------

_KILL_AT = {
    "mid-commit": """
real = W.append_record
def append(path, record):
    if record["unit"] == 3:  # half a line reaches the disk, then the process dies
        line = (json.dumps(record, sort_keys=True) + "\\n").encode()
        with open(path, "ab") as f:
            f.write(line[: len(line) // 2]); f.flush(); os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    real(path, record)
W.append_record = append
""",
    "mid-index": """
real = R.write_atomically
def dying(path, write, **kw):
    def w(tmp):
        write(tmp); os.kill(os.getpid(), signal.SIGKILL)
    real(path, w, **kw)
R.write_atomically = dying
""",
    "before the manifest": """
real = W.write_json
def dying(path, data, what):
    if path.name == "manifest.json":
        os.kill(os.getpid(), signal.SIGKILL)
    real(path, data, what)
W.write_json = dying
""",
}

_RUN = """
import importlib, json, os, signal, sys
sys.path.insert(0, {tests!r})
from models import tiny_model, tiny_tokenizer
import oculi
R, W = (importlib.import_module(f"oculi.harvest.{{m}}") for m in ("run", "writer"))
from test_harvest import word_prompts
ad = oculi.attach(tiny_model("gemma3"), tiny_tokenizer())
{setup}
s = oculi.harvest(ad, word_prompts(50), out={out!r}, sites=["resid_post"], layers=[0, 1],
                  chunk_rows=16, unit_rows=64, batch_tokens=64, progress=False)
print(json.dumps([s.units_computed, s.units]))
"""


def run_harvest(out: Path, setup: str = "") -> subprocess.CompletedProcess:
    script = _RUN.format(tests=str(TESTS), out=str(out), setup=setup)
    return subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True, text=True)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "store"
    run = run_harvest(out)
    assert run.returncode == 0, run.stderr[-2000:]
    return out


@pytest.mark.parametrize("moment", list(_KILL_AT))
def test_sigkill_at_a_chosen_moment_then_one_rerun_equals_uninterrupted(
    uninterrupted, tmp_path, moment
):
    out = tmp_path / "store"
    killed = run_harvest(out, _KILL_AT[moment])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    log = out / "units.jsonl"
    if moment == "mid-commit":
        torn = log.read_bytes()
        assert not torn.endswith(b"\n") and torn.count(b"\n") == 3  # units 0-2, half of 3
    if moment in ("mid-index", "before the manifest"):
        assert not (out / "manifest.json").exists() and (out / "oculi-harvest.json").exists()
        with pytest.raises(HarvestStoreError, match=r"not an oculi harvest store \(no manifest"):
            oculi.open_harvest(out)
    committed = 3 if moment == "mid-commit" else 0
    rerun = run_harvest(out)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert json.loads(rerun.stdout) == [7 - committed, 7]  # one rerun completes it
    lines = log.read_bytes().split(b"\n")
    assert lines[-1] == b"" and sorted(json.loads(x)["unit"] for x in lines[:-1]) == list(range(7))
    assert not [p for p in out.iterdir() if p.name.endswith((".tmp", ".partial"))]
    a, b = oculi.open_harvest(out, verify=True), oculi.open_harvest(uninterrupted)
    for key in b.keys:  # bit for bit
        assert np.asarray(a[key]).tobytes() == np.asarray(b[key]).tobytes()
    assert (out / "index.parquet").read_bytes() == (uninterrupted / "index.parquet").read_bytes()
    for k in range(7):
        assert (out / SHARD).parent.parent.joinpath(str(k), "0").read_bytes() == (
            uninterrupted / SHARD
        ).parent.parent.joinpath(str(k), "0").read_bytes()


def test_a_torn_last_line_is_skipped_by_readers_and_cut_by_the_writer(adapter, reference, tmp_path):
    out = tmp_path / "store"
    shutil.copytree(reference[0], out)
    log = out / "units.jsonl"
    whole = log.read_bytes()
    lines = whole.split(b"\n")[:-1]
    log.write_bytes(b"\n".join(lines[:-1]) + b"\n" + lines[-1][:30])  # unit 6's line torn
    store = oculi.open_harvest(out, allow_incomplete=True)  # a reader leaves the file alone
    assert store.missing_units == [6] and log.read_bytes().endswith(lines[-1][:30])
    done = oculi.harvest(adapter, word_prompts(50), out=out, **KW)
    assert done.units_computed == 1
    assert [json.loads(x)["unit"] for x in log.read_bytes().splitlines()] == list(range(7))
    same_as(out, reference[1])


# --- 8. float16 storage warns when values exceed its range ----------------------------------


@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16])
def test_float16_storage_warns_naming_the_array(tmp_path, model_dtype):
    model = copy.deepcopy(tiny_model("gemma3")).to(model_dtype)  # tiny_model is shared
    model.get_input_embeddings().weight.data[5:7] *= 2e4  # tokens 5 and 6 embed beyond 65504
    ad = oculi.attach(model, tiny_tokenizer())
    kw = dict(sites=["resid_pre", "mlp_in"], layers=[0], **SMALL)
    prompts = word_prompts(50)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # float32 storage: nothing to say
        oculi.harvest(ad, prompts, out=tmp_path / "f32", storage_dtype=torch.float32, **kw)
    with pytest.warns(oculi.StorageRangeWarning) as caught:
        oculi.harvest(ad, prompts, out=tmp_path / "f16", storage_dtype=torch.float16, **kw)
    (message,) = [str(w.message) for w in caught]
    full = np.asarray(oculi.open_harvest(tmp_path / "f32")["resid_pre", 0])
    half = np.asarray(oculi.open_harvest(tmp_path / "f16")["resid_pre", 0])
    peak = np.abs(full).max()
    assert peak > 65504 and f"'resid_pre/0' (|values| up to {peak:.4g}" in message
    assert "mlp_in/0" not in message and "float16 (max 6.55e+04)" in message
    np.testing.assert_array_equal(np.isinf(half), np.abs(full) >= 65520)  # fp16's rounding edge
    token_ids = oculi.open_harvest(tmp_path / "f16").index.column("token_id").to_numpy()
    assert 6 in set(token_ids[np.isinf(half).any(1)]) <= {5, 6}  # only the scaled tokens
    units = sorted({int(r) // 64 for r in np.flatnonzero(np.isinf(half).any(1))})
    log = [json.loads(x) for x in (tmp_path / "f16" / "units.jsonl").read_text().splitlines()]
    assert [r["unit"] for r in log if "overflow" in r] == units
    with pytest.warns(oculi.StorageRangeWarning, match="resid_pre/0"):  # resumed: still said
        oculi.harvest(ad, prompts, out=tmp_path / "f16", storage_dtype=torch.float16, **kw)


# --- 15. harvest errors from the command line: one line naming the file ---------------------


@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory):
    """A saved tiny model, a prompt file and a store the CLI made from them."""
    from oculi.cli import cli

    root = tmp_path_factory.mktemp("cli")
    tiny_model("llama_gqa").save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    (root / "p.jsonl").write_text("".join(json.dumps(p) + "\n" for p in word_prompts(30)))
    argv = ["harvest", "--prompts", str(root / "p.jsonl"), "--sites", "resid_post", "--layers",
            "0", "--model", str(root / "model"), "--device", "cpu", "--quiet"]  # fmt: skip
    res = CliRunner().invoke(cli, [*argv, "--out", str(root / "store")])
    assert res.exit_code == 0, res.output
    return root, argv


def _bad_prompts(root: Path, tmp: Path) -> tuple[list[str], None]:
    (tmp / "p.jsonl").write_bytes(b'"a cat"\n"the dog"\n{"text": oops}\n')
    return ["--prompts", str(tmp / "p.jsonl")], None


def _latin1_prompts(root: Path, tmp: Path) -> tuple[list[str], None]:
    (tmp / "p.jsonl").write_bytes(b'"a cat"\n"caf\xe9"\n')
    return ["--prompts", str(tmp / "p.jsonl")], None


def _store_with(edit):
    def make(root: Path, tmp: Path) -> tuple[list[str], object]:
        shutil.copytree(root / "store", tmp / "store")
        return [], edit(tmp / "store")

    return make


CLI_ERRORS = {
    "a bad JSONL line": (_bad_prompts, "p.jsonl:3 is not valid JSON"),
    "a non-UTF-8 prompt file": (_latin1_prompts, "p.jsonl:2 is not UTF-8 text (byte 0xe9"),
    "a non-JSON manifest": (
        _store_with(lambda s: (s / "manifest.json").write_text("not json")),
        "store/manifest.json' is not valid JSON",
    ),
    "a log line without unit": (
        _store_with(lambda s: (s / "units.jsonl").open("a").write('{"rows": [0, 1]}\n')),
        "store/units.jsonl:2 is not a unit record: it lacks 'unit'",
    ),
    "a store being written": (
        _store_with(lambda s: StoreLock(s).acquire()),  # released when the test ends
        f"is being written by another harvest (pid {os.getpid()} on host {socket.gethostname()}",
    ),
}


@pytest.mark.parametrize("case", list(CLI_ERRORS))
def test_cli_harvest_errors_are_one_line_naming_the_file(cli_setup, tmp_path, case):
    from oculi.cli import cli

    root, argv = cli_setup
    make, message = CLI_ERRORS[case]
    extra, held = make(root, tmp_path)
    try:
        res = CliRunner().invoke(cli, [*argv, "--out", str(tmp_path / "store"), *extra])
    finally:
        if isinstance(held, StoreLock):
            held.release()
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("oculi: error: "), res.stderr
    assert message in lines[0]


@pytest.mark.parametrize(("limit", "file"), [(2000, "index.parquet"), (3000, "resid_post/0/c/0/0")])
def test_cli_file_size_limit_is_one_line_naming_the_file(cli_setup, tmp_path, limit, file):
    root, argv = cli_setup
    out = tmp_path / "store"

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    run = subprocess.run([sys.executable, "-m", "oculi", *argv, "--out", str(out)], env=ENV,
                         capture_output=True, text=True, preexec_fn=limited)  # fmt: skip
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-3000:]
    # (other libraries may log their own warnings on stderr while importing)
    (line,) = [x for x in run.stderr.splitlines() if x.startswith("oculi")]
    assert line.startswith("oculi: error: cannot ") and f"'{out / file}'" in line
    assert "File too large" in line


def test_a_store_of_an_older_oculi_is_named_and_kept(adapter, reference, tmp_path):
    out = tmp_path / "old"
    shutil.copytree(reference[0], out)
    (out / "oculi-harvest.json").unlink()  # format 1 had no marker, only zarr.json's attribute
    (out / "oculi-harvest.lock").unlink()
    before = listing(out)
    for resume in (True, False):
        with pytest.raises(HarvestStoreError, match=r"store of an older oculi \(format 1"):
            oculi.harvest(adapter, word_prompts(50), out=out, resume=resume, **KW)
    assert listing(out) == before


def test_a_full_disk_names_the_file_and_one_rerun_completes(uninterrupted, tmp_path):
    """A real ENOSPC: the store on a 64 kB tmpfs (in a user and mount namespace), then the
    same harvest again once the file system is grown to 16 MB."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode:
        pytest.skip("no user and mount namespaces here (unshare -rm)")
    disk, kept = tmp_path / "disk", tmp_path / "kept"
    disk.mkdir()
    first = _LIMITED_RUN.format(tests=str(TESTS), out=str(disk / "store"), n=50, unit_rows=64,
                                limit="resource.RLIM_INFINITY")  # fmt: skip
    second = _RUN.format(tests=str(TESTS), out=str(disk / "store"), setup="")
    shell = (
        f"mount -t tmpfs -o size=64k tmpfs {disk} || exit 90\n"
        f"{sys.executable} -c {shlex.quote(first)} > {tmp_path}/first.txt || exit 91\n"
        f"mount -o remount,size=16m {disk} || exit 92\n"
        f"{sys.executable} -c {shlex.quote(second)} > {tmp_path}/second.txt || exit 93\n"
        f"cp -r {disk}/store {kept}\n"
    )
    run = subprocess.run(
        ["unshare", "-rm", "sh", "-c", shell], env=ENV, capture_output=True, text=True
    )
    if run.returncode == 90:
        pytest.skip(f"cannot mount a tmpfs here: {run.stderr.strip()}")
    assert run.returncode == 0, run.stderr[-3000:]
    kind, msg = json.loads((tmp_path / "first.txt").read_text().splitlines()[-1])
    assert kind == "FileWriteError" and "No space left on device" in msg and "\n" not in msg
    assert f"'{disk}/store/" in msg  # the file that did not fit, by name
    assert json.loads((tmp_path / "second.txt").read_text().splitlines()[-1]) == [7, 7]
    a, b = oculi.open_harvest(kept, verify=True), oculi.open_harvest(uninterrupted)
    for key in b.keys:
        assert np.asarray(a[key]).tobytes() == np.asarray(b[key]).tobytes()


def test_saving_the_model_keeps_its_harvest_identity(tmp_path):
    """save_pretrained fills in config.architectures on the live model; a harvest started
    before the save must still resume after it."""
    import copy

    from oculi.harvest.run import model_identity

    model = copy.deepcopy(tiny_model("gemma3"))
    model.config.architectures = None
    before = model_identity(oculi.attach(model))
    model.save_pretrained(tmp_path / "saved")
    assert model.config.architectures == ["Gemma3ForCausalLM"]
    assert model_identity(oculi.attach(model)) == before
