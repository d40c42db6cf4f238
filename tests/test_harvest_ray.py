"""The Ray executor on a local 2-CPU Ray cluster: same arrays as the local executor, two
workers sharing the units, and a SIGKILLed driver resumed. Slow to start (~15 s for the
cluster, ~15 s per actor pool on a 2-core machine), so two tests, marked ``ray``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import oculi
from models import tiny_model, tiny_tokenizer
from oculi.harvest import RayExecutor
from oculi.sae import SAE
from test_harvest import SMALL, TESTS, word_prompts

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray

SITES = dict(sites=["resid_post", "z", "mlp_post"], layers=[0, 2])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A local Ray instance with 2 CPUs, and the tiny Gemma 3 saved where actors can load it."""
    folder = tmp_path_factory.mktemp("tiny_gemma3")
    tiny_model("gemma3").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield folder, ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def assert_same_store(a, b):
    """Sites bit for bit; an SAE's latents to float rounding (the encoder's matmul rounds
    with the process's thread count, and actors run with their own)."""
    assert a.index.equals(b.index)
    for key in b.keys:
        if str(key[0]).startswith("sae."):
            np.testing.assert_allclose(np.asarray(a[key]), np.asarray(b[key]), rtol=0, atol=1e-5)
        else:
            np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]))


def test_ray_two_workers_write_the_local_arrays(cluster, tmp_path):
    """Sites and an SAE's latents: the SAE travels to the actors with the plan."""
    folder, _ = cluster
    adapter = oculi.load(folder, device="cpu")
    prompts = word_prompts(150)
    sae = SAE(adapter.d_model, 48, "topk", k=6, site="resid_post", layer=1).init_weights(0)
    local = oculi.harvest(
        adapter, prompts, out=tmp_path / "local", saes={"f": sae}, **SITES, **SMALL
    )
    dist = oculi.harvest(adapter, prompts, out=tmp_path / "ray", executor=RayExecutor(
        model=folder, concurrency=2), saes={"f": sae}, **SITES, **SMALL)  # fmt: skip
    assert dist.units_computed == dist.units == local.units
    ray_store = oculi.open_harvest(tmp_path / "ray")
    assert_same_store(ray_store, oculi.open_harvest(tmp_path / "local"))
    latents = np.asarray(ray_store["sae.f", 1])  # [n_tokens, 48], k = 6 nonzero per row
    assert latents.shape == (dist.tokens, 48) and ((latents != 0).sum(1) <= 6).all()
    assert (latents != 0).sum(1).mean() > 5
    records = [json.loads(x) for x in (tmp_path / "ray" / "units.jsonl").read_text().splitlines()]
    workers = {r["worker"] for r in records}
    assert len(workers) == 2 and f"{os.uname().nodename}:{os.getpid()}" not in workers
    assert sorted(r["unit"] for r in records) == list(range(dist.units))


_KILLED_DRIVER = """
import sys, time
sys.path.insert(0, {tests!r})
import ray
import oculi
from oculi.harvest import RayExecutor
from test_harvest import SMALL, word_prompts

def slow_loader():  # runs in each actor: the model, slowed so the kill lands mid-run
    adapter = oculi.load({folder!r}, device="cpu")
    adapter.layer_modules[0].register_forward_pre_hook(lambda *a: time.sleep(0.1))
    return adapter

ray.init(address={address!r}, log_to_driver=False)
adapter = oculi.load({folder!r}, device="cpu")
oculi.harvest(adapter, word_prompts(200), out={out!r}, sites={sites!r}, layers={layers!r},
              executor=RayExecutor(loader=slow_loader, concurrency=2), **SMALL)
"""


def test_ray_driver_sigkilled_then_resumed(cluster, tmp_path):
    folder, address = cluster
    out = tmp_path / "killed"
    script = _KILLED_DRIVER.format(tests=str(TESTS), folder=str(folder), address=address,
                                   out=str(out), **SITES)  # fmt: skip
    driver = subprocess.Popen(
        [sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    log = out / "units.jsonl"
    deadline = time.monotonic() + 150
    try:
        while time.monotonic() < deadline and driver.poll() is None:
            if log.exists() and len(log.read_text().splitlines()) >= 3:
                break
            time.sleep(0.05)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    done = {json.loads(x)["unit"] for x in log.read_text().splitlines() if x.strip()}
    adapter = oculi.load(folder, device="cpu")
    prompts = word_prompts(200)
    resumed = oculi.harvest(adapter, prompts, out=out, executor=RayExecutor(model=folder, concurrency=2), **SITES, **SMALL)  # fmt: skip
    assert 3 <= len(done) < resumed.units, "the kill must land mid-run"
    assert resumed.units_computed == resumed.units - len(done)
    oculi.harvest(adapter, prompts, out=tmp_path / "clean", **SITES, **SMALL)
    assert_same_store(oculi.open_harvest(out), oculi.open_harvest(tmp_path / "clean"))
