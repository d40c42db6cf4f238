"""Models loaded with a ``device_map``: layers offloaded to disk, or to CPU memory, by accelerate.

Each tiny family is saved and reloaded with ``from_pretrained(folder, device_map=...,
offload_folder=...)`` so that layer 0 stays on the CPU and the others, the embedding, the
final norm and the unembedding are offloaded to disk (their parameters are ``meta``
placeholders and accelerate's ``AlignDevicesHook`` loads them per forward). The same model
is also offloaded to CPU memory with ``accelerate.cpu_offload`` (the hooks' weights map is a
dict of tensors). Everything oculi computes on them must equal the same weights on one device
(fp32, 1e-6), leave no hook of oculi's behind and accelerate's hooks as they were, also when
a call fails.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

import oculi
from models import FAMILIES, prompt_ids, tiny_model
from oculi import patching
from oculi.analysis import AttributionMethods, CompositionAnalysis, HeadWeights
from oculi.analysis.neurons import neuron_attribution
from oculi.capture.configs import CaptureConfig, LogitConfig
from oculi.capture.unembed import soft_cap
from oculi.errors import WeightReadError
from oculi.models.weights import execution_device, read_bias, read_weight

TOL = 1e-6
TARGET = 7
accelerate = pytest.importorskip("accelerate")


def device_map_for(model: nn.Module, disk_layers: set[int], *, rest: str = "disk") -> dict:
    """Every top-level part of ``model`` mapped: the decoder layers in ``disk_layers`` to
    ``"disk"``, the other layers to ``"cpu"``, every other part (embedding, norm, head) to
    ``rest``."""
    layers_path = oculi.attach(model).anatomy.layers
    out: dict[str, str] = {}

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            full = prefix + name
            if full == layers_path:
                for i in range(len(child)):  # type: ignore[arg-type]
                    out[f"{full}.{i}"] = "disk" if i in disk_layers else "cpu"
            elif layers_path.startswith(full + "."):
                walk(child, full + ".")
            else:
                out[full] = rest

    walk(model, "")
    return out


def load_offloaded(family: str, folder) -> nn.Module:
    from transformers import AutoModelForCausalLM

    reference = tiny_model(family)
    reference.save_pretrained(folder / "model")
    dmap = device_map_for(reference, disk_layers={1, 2})
    model = AutoModelForCausalLM.from_pretrained(
        folder / "model",
        device_map=dmap,
        offload_folder=str(folder / "offload"),
        dtype=torch.float32,
        attn_implementation=reference.config._attn_implementation,
    )
    return model.eval()


def cpu_offloaded(family: str) -> nn.Module:
    """The tiny model with every weight held by accelerate's hooks in CPU memory."""
    model = copy.deepcopy(tiny_model(family))
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    return model


@pytest.fixture(scope="module", params=["disk", "cpu_offload"])
def how(request):
    return request.param


_CACHE: dict[tuple[str, str], nn.Module] = {}


def offloaded(family: str, how: str, tmp_path_factory) -> oculi.Adapter:
    key = (family, how)
    if key not in _CACHE:
        if how == "disk":
            _CACHE[key] = load_offloaded(family, tmp_path_factory.mktemp(family))
        else:
            _CACHE[key] = cpu_offloaded(family)
    return oculi.attach(_CACHE[key])


def hook_state(model: nn.Module) -> list[Any]:
    """Every module's own hooks and accelerate's hook, by identity: oculi must leave it so."""
    return [
        (
            name,
            tuple(m._forward_hooks),
            tuple(m._forward_pre_hooks),
            id(getattr(m, "_hf_hook", None)),
            m.forward.__func__ if hasattr(m.forward, "__func__") else m.forward,
        )
        for name, m in model.named_modules()
    ]


def _value(obj: Any, name: str) -> torch.Tensor:
    value = getattr(obj, name)
    return value() if callable(value) else value


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a.float().cpu(), b.float().cpu(), atol=TOL, rtol=TOL)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_weights_are_read_from_the_offload_storage(family, how, tmp_path_factory):
    adapter = offloaded(family, how, tmp_path_factory)
    ref = oculi.attach(tiny_model(family))
    assert adapter.device == torch.device("cpu")
    offloaded_params = [n for n, p in adapter.model.named_parameters() if p.device.type == "meta"]
    assert offloaded_params, "the fixture offloads nothing"
    w_u, b_u, cap = adapter.unembedding()
    r_u, rb_u, rcap = ref.unembedding()
    _close(w_u, r_u)
    assert (b_u is None) == (rb_u is None) and cap == rcap
    o_proj = f"{ref.anatomy.attn}.{ref.anatomy.qkv_proj or ref.anatomy.o_proj}"
    for layer in range(ref.n_layers):
        _close(read_weight(adapter.part(layer, o_proj)), read_weight(ref.part(layer, o_proj)))
    assert adapter.d_vocab == ref.d_vocab and adapter.d_mlp == ref.d_mlp


@pytest.mark.parametrize("family", list(FAMILIES))
def test_captures_grid_dla_lens_composition_equal_one_device(family, how, tmp_path_factory):
    adapter = offloaded(family, how, tmp_path_factory)
    ref = oculi.attach(tiny_model(family))
    before = hook_state(adapter.model)
    ids = prompt_ids()
    cfg = CaptureConfig(capture_head_contributions=True)
    got = adapter.capture_full(ids, attention=cfg, logits=LogitConfig())
    want = ref.capture_full(ids, attention=cfg, logits=LogitConfig())
    for part in ("residual", "attention", "mlp"):
        tensors, expected = getattr(got, part).tensors(), getattr(want, part).tensors()
        assert tensors.keys() == expected.keys()
        for name, tensor in tensors.items():
            _close(tensor, expected[name])
    assert "head_contributions" in got.attention.tensors()
    _close(got.logits.normalized, want.logits.normalized)
    for lens in ("top_k_values", "logsumexp", "entropy", "kl_to_final"):  # the logit lens
        _close(_value(got.logits, lens), _value(want.logits, lens))
    assert torch.equal(got.logits.top_k_indices, want.logits.top_k_indices)
    _close(got.logits.token_logits(TARGET), want.logits.token_logits(TARGET))
    assert hook_state(adapter.model) == before

    dla = AttributionMethods.direct_logit_attribution(got, TARGET)
    ref_dla = AttributionMethods.direct_logit_attribution(want, TARGET)
    _close(dla.values, ref_dla.values)
    capped = soft_cap(torch.as_tensor(dla.total), ref.unembedding()[2])  # Gemma 2's final cap
    assert float(capped) == pytest.approx(float(ref.forward(ids)[-1, TARGET]), abs=1e-4)
    _close(
        neuron_attribution(got, TARGET, adapter).values,
        neuron_attribution(want, TARGET, ref).values,
    )
    top = AttributionMethods.promoted_tokens(got, (1, 2), k=5)
    ref_top = AttributionMethods.promoted_tokens(want, (1, 2), k=5)
    assert [t for t, _ in top] == [t for t, _ in ref_top]
    assert [v for _, v in top] == pytest.approx([v for _, v in ref_top], abs=1e-5)

    w, rw = HeadWeights.from_adapter(adapter), HeadWeights.from_adapter(ref)
    for a, b in zip((w.w_q, w.w_k, w.w_v, w.w_o), (rw.w_q, rw.w_k, rw.w_v, rw.w_o), strict=True):
        _close(a, b)
    _close(
        CompositionAnalysis.composition_scores(adapter, "k"),
        CompositionAnalysis.composition_scores(ref, "k"),
    )
    assert hook_state(adapter.model) == before


@pytest.mark.parametrize("family", ["llama_gqa", "gemma3", "gpt2", "neox_parallel"])
@pytest.mark.parametrize("site", ["resid_pre", "z", "mlp_out"])
def test_patching_grid_equals_one_device(family, site, how, tmp_path_factory):
    adapter = offloaded(family, how, tmp_path_factory)
    ref = oculi.attach(tiny_model(family))
    before = hook_state(adapter.model)
    clean = prompt_ids(9).unsqueeze(0)
    corrupt = clean.clone()
    corrupt[0, 4] = (corrupt[0, 4] + 7) % 90 + 3
    kwargs: dict[str, Any] = dict(
        site=site, metric=patching.logit_diff(5, 6), progress=False, per_head=site == "z"
    )
    got = patching.activation_patching(adapter, clean, corrupt, **kwargs)
    want = patching.activation_patching(ref, clean, corrupt, **kwargs)
    _close(got.values, want.values)
    assert hook_state(adapter.model) == before


def test_hooks_intact_after_an_exception(how, tmp_path_factory):
    adapter = offloaded("llama_mha", how, tmp_path_factory)
    before = hook_state(adapter.model)
    clean = prompt_ids(9).unsqueeze(0)
    corrupt = clean.flip(-1)
    calls = [0]

    def fail_on_third_call(*_: Any) -> None:  # the user's own hook: fails mid-sweep
        calls[0] += 1
        if calls[0] >= 3:
            raise RuntimeError("raised inside the forward")

    user = adapter.layer_modules[2].register_forward_hook(fail_on_third_call)
    try:
        with pytest.raises(RuntimeError, match="inside the forward"):
            patching.activation_patching(
                adapter,
                clean,
                corrupt,
                site="z",
                per_head=True,
                metric=patching.logit_diff(5, 6),
                progress=False,
            )
        calls[0] = 2
        with pytest.raises(RuntimeError, match="inside the forward"):
            adapter.capture_full(clean)
    finally:
        user.remove()
    assert hook_state(adapter.model) == before
    _close(adapter.forward(clean), oculi.attach(tiny_model("llama_mha")).forward(clean))


def test_execution_device_and_errors_for_unloaded_weights():
    lin = nn.Linear(4, 3, device="meta")
    with pytest.raises(WeightReadError, match="meta device .* no accelerate offload hook"):
        read_weight(lin)
    assert execution_device(lin) == torch.device("cpu")
    norm = nn.RMSNorm(4)
    assert read_bias(norm) is None
    with pytest.raises(WeightReadError, match="has no parameter 'kernel'"):
        read_weight(norm, "kernel")


GEMMA_PROMPT = "The Eiffel Tower is located in the city of"


@pytest.mark.gemma
def test_gemma_half_on_disk_gives_the_single_device_report_and_sweep(gemma, tmp_path):
    """The issue's case: Gemma 3 270M with layers 9-17 offloaded to disk. Per-head DLA failed
    there with "Cannot copy out of meta tensor; no data!" (the heads' W_O were placeholders)."""
    from oculi.visualize.report import build_report

    dmap = {f"model.layers.{i}": "disk" if i >= 9 else "cpu" for i in range(gemma.n_layers)}
    dmap.update({p: "cpu" for p in ("model.embed_tokens", "model.norm", "model.rotary_emb")})
    dmap["lm_head"] = "cpu"
    off = oculi.load(device_map=dmap, offload_folder=str(tmp_path / "offload"), dtype="float32")
    on_disk = {n for n, p in off.model.named_parameters() if p.device.type == "meta"}
    assert any(n.startswith("model.layers.17.") for n in on_disk)
    assert not any(n.startswith("model.layers.8.") for n in on_disk)
    before = hook_state(off.model)

    got, want = (
        build_report(off, GEMMA_PROMPT, samples=1),
        build_report(gemma, GEMMA_PROMPT, samples=1),
    )
    assert got.predicted == want.predicted == " Paris"
    assert [t for t, _ in got.top] == [t for t, _ in want.top]
    assert [p for _, p in got.top] == pytest.approx([p for _, p in want.top], abs=1e-6)
    _close(got.lens.probs, want.lens.probs)
    for a, b in zip(got.heads, want.heads, strict=True):
        assert a[:2] == b[:2]
        _close(a[2], b[2])
    _close(got.attribution.values, want.attribution.values)
    _close(got.attribution.heads, want.attribution.heads)  # the per-head DLA that failed
    torch.testing.assert_close(got.tracing.values, want.tracing.values, atol=1e-6, rtol=0)

    clean = gemma.tokenize(GEMMA_PROMPT)[None]
    corrupt = gemma.tokenize(GEMMA_PROMPT.replace("Eiffel", "Pisa"))[None]
    assert corrupt.shape == clean.shape
    metric = patching.logit_diff(" Paris", " Rome")
    kwargs: dict[str, Any] = dict(site="resid_pre", metric=metric, progress=False)
    sweep = patching.activation_patching(off, clean, corrupt, **kwargs)
    ref = patching.activation_patching(gemma, clean, corrupt, **kwargs)
    torch.testing.assert_close(sweep.values, ref.values, atol=1e-5, rtol=0)
    assert sweep.clean_metric == pytest.approx(ref.clean_metric, abs=1e-5)
    assert hook_state(off.model) == before


@pytest.mark.parametrize("family", ["llama_gqa", "gemma3", "gpt2"])
def test_circuit_discovery_equals_one_device(family, how, tmp_path_factory):
    """Edge patching runs module forwards (the offload hooks load weights for them) and EAP
    a backward through them: both give the single-device numbers."""
    from models import tiny_tokenizer
    from oculi.discovery import Graph, eap, patch_edges
    from oculi.patching.metrics import logit_diff

    adapter = oculi.attach(offloaded(family, how, tmp_path_factory).model, tiny_tokenizer())
    ref = oculi.attach(tiny_model(family), tiny_tokenizer())
    before = hook_state(adapter.model)
    clean, corrupt = "the cat sat on the red", "the dog ran in the blue"
    metric = logit_diff("house", "tree")
    graph, ref_graph = Graph.from_adapter(adapter, "heads"), Graph.from_adapter(ref, "heads")
    assert [e.name for e in graph.edges] == [e.name for e in ref_graph.edges]
    weights = torch.rand(3, len(graph.edges), generator=torch.Generator().manual_seed(0))
    _close(
        patch_edges(adapter, graph, clean, corrupt, weights, metric),
        patch_edges(ref, ref_graph, clean, corrupt, weights, metric),
    )
    got = eap(adapter, graph, clean, corrupt, metric=metric).values
    want = eap(ref, ref_graph, clean, corrupt, metric=metric).values
    torch.testing.assert_close(got.float(), want.float(), atol=1e-5, rtol=1e-5)
    assert hook_state(adapter.model) == before


@pytest.mark.parametrize("family", ["llama_mha", "gemma2", "neox_parallel"])
def test_interventions_and_generation_equal_one_device(family, how, tmp_path_factory):
    """Writes land on the device the layer runs on (offloaded layers included): a head
    ablation, a scaled head and a steering vector give the single-device logits, in a plain
    forward and in greedy generation with the KV cache."""
    from oculi.intervention import HeadAblation, InterventionContext, SpectraScaler, SteeringVector

    adapter = offloaded(family, how, tmp_path_factory)
    ref = oculi.attach(tiny_model(family))
    before = hook_state(adapter.model)
    ids = prompt_ids()
    vector = torch.randn(ref.d_model, generator=torch.Generator().manual_seed(1))

    def edits() -> list:
        return [
            HeadAblation(layer=1, head=2),
            SpectraScaler(layer=2, head=0, alpha=1.5),
            SteeringVector(vector, layer=2, coefficient=0.5),
        ]

    results = []
    for a in (adapter, ref):
        with InterventionContext(a, edits()):
            results.append((a.forward(ids), a.generate_ids(ids, max_new_tokens=5)))
    _close(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
    assert (results[1][0] - ref.forward(ids)).abs().max() > 1e-3  # the edits change the logits
    assert hook_state(adapter.model) == before


def test_harvest_equals_one_device(how, tmp_path_factory, tmp_path):
    """A harvest of an offloaded model stores the rows the single-device model stores."""
    pytest.importorskip("zarr")
    pytest.importorskip("pyarrow")
    from models import tiny_tokenizer

    adapter = oculi.attach(offloaded("gemma3", how, tmp_path_factory).model, tiny_tokenizer())
    ref = oculi.attach(tiny_model("gemma3"), tiny_tokenizer())
    before = hook_state(adapter.model)
    prompts = ["the cat sat on the red tree", "a dog ran", "mary gave john the book"]
    small: dict[str, Any] = dict(chunk_rows=8, unit_rows=16, batch_tokens=16, progress=False)
    sites = ["resid_post", "mlp_out", "k"]
    for a, out in ((adapter, tmp_path / "off"), (ref, tmp_path / "ref")):
        oculi.harvest(a, prompts, sites=sites, layers=[0, 2], out=out, **small)
    got, want = oculi.open_harvest(tmp_path / "off"), oculi.open_harvest(tmp_path / "ref")
    assert got.n_rows == want.n_rows > 0
    for site in sites:
        for layer in (0, 2):
            _close(torch.as_tensor(got[site, layer][:]), torch.as_tensor(want[site, layer][:]))
    assert hook_state(adapter.model) == before


@pytest.mark.parametrize("family", ["llama_mha", "gemma3"])
def test_provenance_hashes_offloaded_weights_as_in_memory(family, how, tmp_path_factory):
    """A run's weights hash reads offloaded tensors from their hooks (tied ones once)."""
    from oculi.experiments.provenance import params_sha256

    adapter = offloaded(family, how, tmp_path_factory)
    assert params_sha256(adapter.model) == params_sha256(tiny_model(family))


# -- the memory plan and the CLI on a device map ----------------------------------------------
def _layer_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def test_memory_plan_counts_each_offloaded_layers_load(tmp_path_factory):
    from oculi.capture.memory import plan_capture

    adapter = offloaded("llama_mha", "disk", tmp_path_factory)
    ref = oculi.attach(tiny_model("llama_mha"))
    requests = {"resid_pre": list(range(3)), "pattern": [0, 2]}
    batch = adapter.prepare(prompt_ids()[None])
    plan = plan_capture(adapter, batch, requests, free={"cpu": None})
    ref_plan = plan_capture(ref, ref.prepare(prompt_ids()[None]), requests, free={"cpu": None})
    # layers 1 and 2 are on disk: the largest of them is loaded for its forward
    loaded = max(_layer_bytes(ref.layer_modules[i]) for i in (1, 2))
    assert plan.need["cpu"] - ref_plan.need["cpu"] == loaded


def _on_a_second_device(family: str) -> oculi.Adapter:
    """The tiny model planned as a machine with a GPU would run it: layers 1-2 offloaded
    with accelerate's hooks whose execution device is ``cuda:1`` (nothing runs: plans only)."""
    from accelerate.hooks import attach_align_device_hook

    model = copy.deepcopy(tiny_model(family))
    for i in (1, 2):
        attach_align_device_hook(
            model.model.layers[i], execution_device=torch.device("cuda:1"), offload=True
        )
    return oculi.attach(model)


def test_memory_plan_names_the_device_that_runs_out():
    from oculi.capture.memory import forward_bytes, plan_capture, plan_sweep
    from oculi.errors import MemoryPlanError

    adapter = _on_a_second_device("llama_mha")
    ref = tiny_model("llama_mha")
    batch = adapter.prepare(torch.randint(3, 90, (4, 32)))
    requests = {"resid_pre": [0, 1, 2]}
    plan = plan_capture(adapter, batch, requests, free={"cpu": 2**40, "cuda:1": 2**40})
    assert set(plan.need) == {"cpu", "cuda:1"}  # both devices run layers
    with pytest.raises(MemoryPlanError, match=r"on cuda:1 .*\(layers 1-2 run there, loading"):
        plan_capture(adapter, batch, requests, free={"cpu": 2**40, "cuda:1": 10_000})
    per_copy = forward_bytes(adapter, 32, eager_layers=True)
    loaded = _layer_bytes(ref.model.layers[1])
    free = int((per_copy + loaded // 2) / 0.8)  # one copy fits cpu, not with cuda:1's load
    with pytest.raises(MemoryPlanError, match=r"on cuda:1 plus .* of offloaded weights"):
        plan_sweep(adapter, 32, None, 10, free=free)
    assert plan_sweep(adapter, 32, None, 10, free=int((per_copy + loaded) / 0.8) + 1) == 1


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from models import tiny_tokenizer

    folder = tmp_path_factory.mktemp("tiny_cli")
    tiny_model("llama_gqa").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_info_and_verify_show_the_device_map(tiny_folder, tmp_path):
    import json

    from click.testing import CliRunner

    from oculi.cli import cli

    dmap = device_map_for(tiny_model("llama_gqa"), disk_layers={1, 2}, rest="cpu")
    args = ["--device-map", json.dumps(dmap), "--offload-folder", str(tmp_path / "off")]
    got = CliRunner().invoke(cli, ["info", str(tiny_folder), *args, "--json"])
    assert got.exit_code == 0, got.output
    facts = json.loads(got.stdout)
    assert facts["device_map"] == {
        "cpu": "model.embed_tokens, model.layers.0, model.norm, model.rotary_emb, lm_head",
        "disk": "model.layers.1-2",
    }
    ref = tiny_model("llama_gqa")
    size = sum(_layer_bytes(ref.model.layers[i]) for i in (1, 2)) / 2**10
    assert facts["offloaded"] == f"2 layers, {size:.1f} KiB (disk)"
    assert facts["quantization"] is None
    text = CliRunner().invoke(cli, ["info", str(tiny_folder), *args]).stdout
    assert "disk: model.layers.1-2" in text
    out = CliRunner().invoke(cli, ["verify", str(tiny_folder), *args])
    assert out.exit_code == 0, out.output  # oculi reads the offloaded model exactly
    assert "on disk: model.layers.1-2" in out.stdout and "offloaded: 2 layers" in out.stdout
    bad = CliRunner().invoke(cli, ["info", str(tiny_folder), "--device-map", "[1, 2]"])
    assert bad.exit_code == 2 and "neither 'auto' nor a JSON object" in bad.output
