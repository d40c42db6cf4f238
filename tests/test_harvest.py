"""oculi.harvest on tiny models: rows against per-prompt captures, the index, the store layout,
resume after kills and damage, shuffled reading, and the errors users hit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import oculi
from models import WORDS, tiny_model, tiny_tokenizer
from oculi.harvest import HarvestStoreError, LocalExecutor
from oculi.harvest.compute import pack_batches

pytest.importorskip("zarr")
pytest.importorskip("pyarrow")

TESTS = Path(__file__).parent
SMALL = dict(chunk_rows=16, unit_rows=64, batch_tokens=64, progress=False)


def word_prompts(n: int, seed: int = 0, longest: int = 12) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, rng.integers(1, longest))) for _ in range(n)]


@pytest.fixture(scope="module")
def adapter():
    return oculi.attach(tiny_model("gemma3"), tiny_tokenizer())


def head_rows(t: torch.Tensor) -> np.ndarray:
    """Per-head capture ``[H, T, D]`` -> the store's row layout ``[T, H * D]``."""
    return t.permute(1, 0, 2).reshape(t.shape[1], -1).numpy()


@pytest.mark.parametrize("family", ["llama_gqa", "gemma3", "gpt2", "neox_parallel"])
def test_rows_equal_per_prompt_captures(family, tmp_path):
    ad = oculi.attach(tiny_model(family), tiny_tokenizer())
    prompts = word_prompts(40, seed=1)
    summary = oculi.harvest(
        ad, prompts, sites=["resid_post", "mlp_out", "k"], layers=[0, -1], out=tmp_path, **SMALL
    )
    store = oculi.open_harvest(tmp_path)
    n_tokens = sum(len(tiny_tokenizer()(p)["input_ids"]) for p in prompts)
    assert summary.tokens == store.n_rows == n_tokens
    assert summary.rows == {
        f"{s}/{layer}": n_tokens for s in ("resid_post", "mlp_out", "k") for layer in (0, 2)
    }
    assert summary.units == summary.units_computed == -(-n_tokens // 64)
    resid, mlp_out, keys = (np.asarray(store[s, 2]) for s in ("resid_post", "mlp_out", "k"))
    assert keys.shape == (n_tokens, ad.n_kv_heads * ad.d_head)
    index = store.index.to_pydict()
    for p, text in enumerate(prompts):
        rows = store.rows_of(prompt_ids=[p])
        ids = tiny_tokenizer()(text)["input_ids"]
        assert [index["position"][r] for r in rows] == list(range(len(ids)))
        assert [index["token_id"][r] for r in rows] == ids
        full = ad.capture_full(text, attention=oculi.CaptureConfig(layers=[2]),
                               residual=oculi.ResidualConfig(layers=[2], capture_mlp_out=True),
                               mlp=None, logits=None)  # fmt: skip
        np.testing.assert_allclose(resid[rows], full.residual.post_mlp[0].numpy(), atol=1e-5)
        np.testing.assert_allclose(mlp_out[rows], full.residual.mlp_out[0].numpy(), atol=1e-5)
        np.testing.assert_allclose(keys[rows], head_rows(full.attention.keys[0]), atol=1e-5)
    # rows are prompt after prompt, in input order
    assert index["prompt_id"] == sorted(index["prompt_id"])


def test_store_layout_is_plain_zarr_and_parquet(adapter, tmp_path):
    import pyarrow.parquet as pq
    import zarr

    prompts = word_prompts(30)
    oculi.harvest(adapter, prompts, sites="resid_post", layers=1, out=tmp_path, split=0.2,
                  storage_dtype=torch.float16, compression="zstd", **SMALL)  # fmt: skip
    z = zarr.open_array(str(tmp_path / "resid_post" / "1"), mode="r")
    n = pq.read_metadata(tmp_path / "index.parquet").num_rows
    assert z.shape == (n, adapter.d_model) and z.dtype == np.float16
    assert z.chunks == (16, adapter.d_model) and z.shards == (64, adapter.d_model)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["config"]["sites"] == ["resid_post"] and manifest["config"]["layers"] == [1]
    assert manifest["model"]["family"] == "gemma3"
    assert manifest["tokens"]["n_prompts"] == 30 and manifest["tokens"]["n_tokens"] == n
    assert {"torch", "zarr", "oculi"} <= set(manifest["provenance"]["versions"])
    store = oculi.open_harvest(tmp_path)
    ref = adapter.capture_residual(prompts[3], oculi.ResidualConfig(layers=[1])).post_mlp[0]
    np.testing.assert_allclose(store["resid_post", 1][store.rows_of(prompt_ids=[3])],
                               ref.half().numpy(), atol=1e-3)  # fmt: skip
    # split: 6 of 30 prompts held out, whole prompts only
    index = store.index.to_pydict()
    split_of = {}
    for pid, s in zip(index["prompt_id"], index["split"]):
        assert split_of.setdefault(pid, s) == s
    assert sorted(split_of.values()).count("test") == 6
    assert len(store.rows_of("test")) + len(store.rows_of("train")) == n


def test_inputs_jsonl_dataset_column_and_max_length(adapter, tmp_path):
    prompts = word_prompts(12, seed=4, longest=20)
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps({"text": p}) for p in prompts) + "\n")
    a = oculi.harvest(
        adapter, str(path), sites="resid_pre", layers=[0], out=tmp_path / "a", max_length=5, **SMALL
    )
    rows = [{"text": p, "label": i} for i, p in enumerate(prompts)]  # a Dataset iterates rows
    b = oculi.harvest(
        adapter, rows, sites="resid_pre", layers=[0], out=tmp_path / "b", max_length=5, **SMALL
    )
    assert (
        a.tokens == b.tokens == sum(min(len(tiny_tokenizer()(p)["input_ids"]), 5) for p in prompts)
    )
    sa, sb = oculi.open_harvest(tmp_path / "a"), oculi.open_harvest(tmp_path / "b")
    np.testing.assert_array_equal(np.asarray(sa["resid_pre", 0]), np.asarray(sb["resid_pre", 0]))
    assert max(sa.index.column("position").to_pylist()) == 4


def test_packing_respects_budget():
    lengths = {0: 5, 1: 9, 2: 3, 3: 9, 4: 40, 5: 1}
    batches = pack_batches(lengths, 20)
    assert sorted(p for b in batches for p in b) == list(range(6))
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[p] for p in b) <= 20
    assert batches[0] == [4]  # longer than the budget: alone


def test_resume_skips_committed_and_redoes_truncated_shard(adapter, tmp_path):
    prompts = word_prompts(50)
    first = oculi.harvest(adapter, prompts, sites="resid_post", layers=[2], out=tmp_path, **SMALL)
    ref = np.asarray(oculi.open_harvest(tmp_path)["resid_post", 2])
    again = oculi.harvest(adapter, prompts, sites="resid_post", layers=[2], out=tmp_path, **SMALL)
    assert again.units_computed == 0 and first.units_computed == first.units
    shard = tmp_path / "resid_post" / "2" / "c" / "2" / "0"
    shard.write_bytes(shard.read_bytes()[:-100])  # a shard cut short (crash, full disk)
    redo = oculi.harvest(adapter, prompts, sites="resid_post", layers=[2], out=tmp_path, **SMALL)
    assert redo.units_computed == 1
    np.testing.assert_array_equal(np.asarray(oculi.open_harvest(tmp_path)["resid_post", 2]), ref)


def test_verify_finds_a_flipped_byte(adapter, tmp_path):
    prompts = word_prompts(50)
    oculi.harvest(adapter, prompts, sites="resid_post", layers=[2], out=tmp_path, **SMALL)
    ref = np.asarray(oculi.open_harvest(tmp_path)["resid_post", 2])
    shard = tmp_path / "resid_post" / "2" / "c" / "1" / "0"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF  # same size: only checksums see it
    shard.write_bytes(bytes(data))
    assert oculi.open_harvest(tmp_path).verify() == [1]
    plain = oculi.harvest(adapter, prompts, sites="resid_post", layers=[2], out=tmp_path, **SMALL)
    assert plain.units_computed == 0  # a stat cannot see it
    fixed = oculi.harvest(
        adapter, prompts, sites="resid_post", layers=[2], out=tmp_path, verify=True, **SMALL
    )
    assert fixed.units_computed == 1
    np.testing.assert_array_equal(np.asarray(oculi.open_harvest(tmp_path)["resid_post", 2]), ref)


_KILLED_RUN = """
import sys, time
sys.path.insert(0, {tests!r})
import numpy as np
from models import tiny_model, tiny_tokenizer
import oculi
sys.path.insert(0, {tests!r}); from test_harvest import word_prompts, SMALL
ad = oculi.attach(tiny_model("gemma3"), tiny_tokenizer())
ad.layer_modules[0].register_forward_pre_hook(lambda *a: time.sleep(0.05))  # slow enough to kill
oculi.harvest(ad, word_prompts(120), sites=["resid_post", "mlp_in"], layers=[0, 2], out={out!r}, **SMALL)
"""


def test_sigkill_mid_run_then_resume_equals_uninterrupted(adapter, tmp_path):
    out = tmp_path / "killed"
    script = _KILLED_RUN.format(tests=str(TESTS), out=str(out))
    proc = subprocess.Popen(
        [sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    log = out / "units.jsonl"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if log.exists() and len(log.read_text().splitlines()) >= 3:
                break
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done_before = len(set(json.loads(x)["unit"] for x in log.read_text().splitlines() if x.strip()))
    kwargs = dict(sites=["resid_post", "mlp_in"], layers=[0, 2], **SMALL)
    resumed = oculi.harvest(adapter, word_prompts(120), out=out, **kwargs)
    assert 3 <= done_before < resumed.units, "the kill must land mid-run"
    assert resumed.units_computed == resumed.units - done_before
    clean = oculi.harvest(adapter, word_prompts(120), out=tmp_path / "clean", **kwargs)
    a, b = oculi.open_harvest(out), oculi.open_harvest(tmp_path / "clean")
    assert a.index.equals(b.index)
    for key in b.keys:
        np.testing.assert_allclose(np.asarray(a[key]), np.asarray(b[key]), atol=1e-6)
    units = [json.loads(x)["unit"] for x in log.read_text().splitlines() if x.strip()]
    assert sorted(set(units)) == list(range(resumed.units))
    assert clean.units_computed == clean.units


def test_shuffled_covers_every_row_once_reproducibly(adapter, tmp_path):
    oculi.harvest(adapter, word_prompts(80), sites=["resid_post", "mlp_out"], layers=[1],
                  out=tmp_path, split=0.25, **SMALL)  # fmt: skip
    store = oculi.open_harvest(tmp_path)
    x = np.asarray(store["resid_post", 1])
    for window in (1 << 30, 3 * 16 * 2 * 64 * 4):  # one window; three chunks per window
        epoch0 = list(store.shuffled(7, 50, window_bytes=window))
        rows = np.concatenate([b.rows for b in epoch0])
        assert sorted(rows.tolist()) == list(range(store.n_rows))
        assert [len(b) for b in epoch0[:-1]] == [50] * (len(epoch0) - 1)
        again = np.concatenate([b.rows for b in store.shuffled(7, 50, window_bytes=window)])
        np.testing.assert_array_equal(rows, again)
        other = np.concatenate(
            [b.rows for b in store.shuffled(7, 50, epoch=1, window_bytes=window)]
        )
        assert not np.array_equal(rows, other) and sorted(other) == sorted(rows)
        for b in epoch0[:3]:
            np.testing.assert_array_equal(b["resid_post", 1], x[b.rows])
    test_rows = np.concatenate([b.rows for b in store.shuffled(0, 32, split="test")])
    np.testing.assert_array_equal(np.sort(test_rows), store.rows_of("test"))
    assert sum(len(b) for b in store.shuffled(0, 32, drop_last=True)) == store.n_rows // 32 * 32


def test_torch_dataset_feeds_a_dataloader(adapter, tmp_path):
    oculi.harvest(
        adapter, word_prompts(40), sites=["resid_post"], layers=[0, 1], out=tmp_path, **SMALL
    )
    store = oculi.open_harvest(tmp_path)
    ds = store.torch_dataset("resid_post", 1, batch_rows=32, seed=3)
    loader = torch.utils.data.DataLoader(ds, batch_size=None)
    batches = list(loader)
    assert all(isinstance(b, torch.Tensor) and b.shape[1] == adapter.d_model for b in batches)
    assert sum(len(b) for b in batches) == store.n_rows
    full = torch.from_numpy(np.asarray(store["resid_post", 1]))
    assert torch.allclose(torch.cat(batches).sum(0), full.sum(0), atol=1e-3)
    second = list(loader)  # the next epoch: another order
    assert not torch.equal(torch.cat(second), torch.cat(batches))
    pair = next(iter(store.torch_dataset(("resid_post", 0), ("resid_post", 1), batch_rows=8)))
    assert len(pair) == 2 and pair[0].shape == pair[1].shape == (8, adapter.d_model)


def test_array_reads(adapter, tmp_path):
    oculi.harvest(adapter, word_prompts(20), sites="mlp_post", layers=[1], out=tmp_path, **SMALL)
    arr = oculi.open_harvest(tmp_path)["mlp_post", 1]
    full = np.asarray(arr)
    assert full.shape == arr.shape == (len(arr), adapter.d_mlp)
    np.testing.assert_array_equal(arr[5:9], full[5:9])
    np.testing.assert_array_equal(arr[[9, 2, 2, -1]], full[[9, 2, 2, -1]])
    np.testing.assert_array_equal(arr[3], full[3])
    with pytest.raises(IndexError, match="out of range"):
        arr[[len(arr)]]


def test_bad_inputs(adapter, tmp_path):
    prompts = word_prompts(5)
    kw = dict(out=tmp_path / "s", progress=False)
    with pytest.raises(oculi.UnknownSiteError, match="did you mean 'resid_post'"):
        oculi.harvest(adapter, prompts, sites=["resid_pst"], layers=[0], **kw)
    with pytest.raises(oculi.InputError, match="'pattern' is not harvestable"):
        oculi.harvest(adapter, prompts, sites=["pattern"], layers=[0], **kw)
    with pytest.raises(oculi.LayerIndexError, match=r"3 layers \(0..2\)"):
        oculi.harvest(adapter, prompts, sites=["resid_post"], layers=[5], **kw)
    with pytest.raises(oculi.InputError, match="prompt 1 is empty"):
        oculi.harvest(adapter, ["a cat", ""], sites=["resid_post"], layers=[0], **kw)
    with pytest.raises(oculi.InputError, match="wrap a single prompt in a list"):
        oculi.harvest(adapter, "the cat", sites=["resid_post"], layers=[0], **kw)
    with pytest.raises(oculi.InputError, match="does not exist"):
        oculi.harvest(adapter, "nope.jsonl", sites=["resid_post"], layers=[0], **kw)
    with pytest.raises(oculi.InputError, match="prompt 0 has 70 tokens > context 64"):
        oculi.harvest(adapter, [" ".join(["cat"] * 69)], sites=["resid_post"], layers=[0], **kw)
    with pytest.raises(oculi.InputError, match="no bfloat16"):
        oculi.harvest(
            adapter, prompts, sites=["resid_post"], layers=[0], storage_dtype=torch.bfloat16, **kw
        )
    with pytest.raises(oculi.InputError, match="executor must be"):
        oculi.harvest(adapter, prompts, sites=["resid_post"], layers=[0], executor="slurm", **kw)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(HarvestStoreError, match="not an oculi harvest store"):
        oculi.harvest(
            adapter,
            prompts,
            sites=["resid_post"],
            layers=[0],
            out=tmp_path / "other",
            progress=False,
        )
    assert (tmp_path / "other" / "notes.txt").exists()


def test_resume_refuses_other_prompts_or_config(adapter, tmp_path):
    prompts = word_prompts(20)
    oculi.harvest(adapter, prompts, sites="resid_post", layers=[0], out=tmp_path, **SMALL)
    with pytest.raises(HarvestStoreError, match="other prompts"):
        oculi.harvest(adapter, prompts[:-1], sites="resid_post", layers=[0], out=tmp_path, **SMALL)
    with pytest.raises(HarvestStoreError, match=r"another configuration \(layers"):
        oculi.harvest(adapter, prompts, sites="resid_post", layers=[1], out=tmp_path, **SMALL)
    other = oculi.attach(tiny_model("llama_gqa"), tiny_tokenizer())
    with pytest.raises(HarvestStoreError, match="another model"):
        oculi.harvest(other, prompts, sites="resid_post", layers=[0], out=tmp_path, **SMALL)
    fresh = oculi.harvest(
        adapter, prompts, sites="resid_post", layers=[1], out=tmp_path, resume=False, **SMALL
    )
    assert fresh.units_computed == fresh.units
    assert oculi.open_harvest(tmp_path).layers == [1]


def test_incomplete_store_is_refused_unless_asked(adapter, tmp_path):
    prompts = word_prompts(30)

    class Failing(LocalExecutor):
        """Stops after two units, like a crash."""

        def run(self, adapter, plan, tokens, units, writer):
            super().run(adapter, plan, tokens, units[:2], writer)
            raise RuntimeError("node lost")

    with pytest.raises(RuntimeError, match="node lost"):
        oculi.harvest(adapter, prompts, sites="resid_post", layers=[0], out=tmp_path,
                      executor=Failing(progress=False), **SMALL)  # fmt: skip
    with pytest.raises(HarvestStoreError, match="incomplete: .* re-run the same"):
        oculi.open_harvest(tmp_path)
    assert len(oculi.open_harvest(tmp_path, allow_incomplete=True).missing_units) > 0
    done = oculi.harvest(adapter, prompts, sites="resid_post", layers=[0], out=tmp_path, **SMALL)
    assert done.units_computed == done.units - 2
    assert oculi.open_harvest(tmp_path).complete


def test_oculi_pickles_by_reference():
    """Ray ships a user's loader function with the modules it uses: oculi (a lazy module
    subclass) must pickle as a reference to the imported module."""
    import pickle

    assert pickle.loads(pickle.dumps(oculi)) is oculi


def test_other_prompts_are_named_before_the_sizes_they_imply(adapter, tmp_path):
    """Without explicit chunk sizes the stored configuration follows from the data: a resume
    with other prompts names the prompts, not a chunk size that differs because of them."""
    prompts = word_prompts(20)
    oculi.harvest(adapter, prompts, sites="resid_post", layers=[0], out=tmp_path, progress=False)
    with pytest.raises(HarvestStoreError, match="other prompts"):
        oculi.harvest(
            adapter, prompts[:3], sites="resid_post", layers=[0], out=tmp_path, progress=False
        )
