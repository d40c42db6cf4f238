"""Reliability: contexts in any order, threads, masks, wide batches, overflow, inference mode.

Every numbered case of the reliability issue, each reproduced here first:

- contexts closed out of order (by hand, by ``ExitStack``, by generators) keep exactly the
  still-open interventions, checked against a forward with hand-written torch hooks that apply
  only those; the model is restored exactly when the last one closes;
- captures in several threads equal single-thread runs, and a plain forward beside a capture or
  beside an open intervention context equals the plain forward alone;
- masks, padded widths and non-prompt inputs are refused before any forward;
- overflowing interventions raise, naming the intervention; fp16 storage warns, naming the site;
- attribution patching works under ``torch.inference_mode()``.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import re
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import pytest
import torch

import oculi
from models import D_HEAD, D_MODEL, prompt_ids, tiny_model
from oculi.capture import bridge
from oculi.intervention import (
    HeadAblation,
    Intervention,
    InterventionContext,
    SpectraScaler,
    SteeringVector,
)
from test_hygiene import _hook_fns, oculi_hooks, snapshot

# -- hand-written references ------------------------------------------------------------------
# Each intervention of the ordering tests, and the same change written as plain torch hooks on
# the Hugging Face modules of the LLaMA model (no oculi code involved).
STEER_LAYER, ABLATE_LAYER, ABLATE_HEAD, SCALE_LAYER, SCALE_HEAD, ALPHA = 0, 2, 1, 1, 3, 3.0


def _steer_vec() -> torch.Tensor:
    return torch.linspace(-2.0, 2.0, D_MODEL)


def interventions() -> dict[str, Intervention]:
    return {
        "steer": SteeringVector(_steer_vec(), layer=STEER_LAYER),
        "ablate": HeadAblation(layer=ABLATE_LAYER, head=ABLATE_HEAD),
        "scale": SpectraScaler(layer=SCALE_LAYER, head=SCALE_HEAD, alpha=ALPHA),
    }


USES_BRIDGE = {"steer": False, "ablate": True, "scale": True}


def _reference_hooks(model: torch.nn.Module, name: str) -> list:
    layers = model.model.layers
    if name == "steer":  # resid_post += vec
        return [
            layers[STEER_LAYER].register_forward_hook(
                lambda _m, _a, out: (
                    (out[0] + _steer_vec(), *out[1:])
                    if isinstance(out, tuple)
                    else out + _steer_vec()
                )
            )
        ]
    if name == "ablate":  # z of the head = 0, i.e. its columns of o_proj's input

        def zero(_m, args):
            x = args[0].clone()
            x[..., ABLATE_HEAD * D_HEAD : (ABLATE_HEAD + 1) * D_HEAD] = 0
            return (x,)

        return [layers[ABLATE_LAYER].self_attn.o_proj.register_forward_pre_hook(zero)]

    # scale: the head's query times alpha; RoPE is linear, so scaling q_proj's output is the same
    def scale(_m, _a, out):
        out = out.clone()
        out[..., SCALE_HEAD * D_HEAD : (SCALE_HEAD + 1) * D_HEAD] *= ALPHA
        return out

    return [layers[SCALE_LAYER].self_attn.q_proj.register_forward_hook(scale)]


def reference_logits(model: torch.nn.Module, ids: torch.Tensor, names) -> torch.Tensor:
    handles = [h for n in names for h in _reference_hooks(model, n)]
    try:
        with torch.no_grad():
            return model(ids[None]).logits[0]
    finally:
        for h in handles:
            h.remove()


def own_hooks(model: torch.nn.Module) -> list[int]:
    return sorted(
        id(fn)
        for fn in _hook_fns(model)
        if not getattr(fn, "__module__", "").startswith("transformers")
    )


@pytest.fixture
def llama():
    model = tiny_model("llama_gqa")
    before, own = snapshot(model), own_hooks(model)
    yield oculi.attach(model)
    after = snapshot(model)
    assert oculi_hooks(model) == 0
    assert after["attn"] == before["attn"], "attention implementation not restored"
    assert after["hash"] == before["hash"], "parameters or buffers changed"
    # transformers adds persistent hooks of its own the first time output_attentions is asked
    assert own_hooks(model) == own, "hooks left behind"
    assert not bridge._ACTIVE and not bridge._OWNERS


def all_references(model: torch.nn.Module, ids: torch.Tensor) -> dict[frozenset, torch.Tensor]:
    """The reference logits of every subset of the interventions (before any context opens:
    an open context would change these forwards too)."""
    names = list(interventions())
    return {
        frozenset(sub): reference_logits(model, ids, sub)
        for n in range(len(names) + 1)
        for sub in itertools.combinations(names, n)
    }


def check_open(a: oculi.Adapter, refs: dict, still_open: list[str], original: str) -> None:
    got = a.forward(prompt_ids())
    want = refs[frozenset(still_open)]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if still_open:  # the interventions change the logits: the comparison has teeth
        assert not torch.allclose(want, refs[frozenset()], atol=1e-3)
    bridged = any(USES_BRIDGE[n] for n in still_open)
    assert a.model.config._attn_implementation == ("oculi" if bridged else original)


# -- 1. contexts closed in any order ------------------------------------------------------------
ORDERS = [
    (opened, closing)
    for n in (2, 3)
    for opened in itertools.permutations(["steer", "ablate", "scale"], n)
    if n == 3 or opened[0] < opened[1]
    for closing in itertools.permutations(opened)
]


@pytest.mark.parametrize(("opened", "closing"), ORDERS, ids=lambda o: "-".join(o))
def test_contexts_close_in_any_order(llama, opened, closing):
    a = llama
    refs = all_references(a.model, prompt_ids())
    original = a.model.config._attn_implementation
    ivs = interventions()
    contexts = {name: InterventionContext(a, [ivs[name]]) for name in opened}
    try:
        for name in opened:
            contexts[name].__enter__()
        still_open = list(opened)
        check_open(a, refs, still_open, original)
        for name in closing:
            contexts[name].__exit__(None, None, None)
            still_open.remove(name)
            check_open(a, refs, still_open, original)
            assert contexts[name].active is False
    finally:
        for c in contexts.values():
            c.__exit__(None, None, None)


def test_exit_stack_failure_closes_the_outer_context_first(llama):
    a = llama
    refs = all_references(a.model, prompt_ids())
    original = a.model.config._attn_implementation
    ivs = interventions()
    inner = InterventionContext(a, [ivs["ablate"]])
    with pytest.raises(RuntimeError, match="between"), ExitStack() as stack:
        stack.enter_context(InterventionContext(a, [ivs["scale"]]))
        inner.__enter__()  # entered by hand, so the stack does not close it
        raise RuntimeError("a failure in between")
    check_open(a, refs, ["ablate"], original)
    inner.__exit__(None, None, None)
    check_open(a, refs, [], original)


def test_contexts_held_by_generators_close_in_either_order(llama):
    a = llama
    refs = all_references(a.model, prompt_ids())
    original = a.model.config._attn_implementation
    ivs = interventions()

    def held(name: str) -> Iterator[None]:
        with InterventionContext(a, [ivs[name]]):
            while True:
                yield

    first, second = held("scale"), held("steer")
    next(first)
    next(second)
    check_open(a, refs, ["scale", "steer"], original)
    first.close()  # the earlier context closes first
    check_open(a, refs, ["steer"], original)
    second.close()
    check_open(a, refs, [], original)


def test_capture_inside_a_context_records_the_still_open_interventions(llama):
    a, ids = llama, prompt_ids()
    ivs = interventions()
    outer, inner = InterventionContext(a, [ivs["ablate"]]), InterventionContext(a, [ivs["steer"]])
    outer.__enter__()
    inner.__enter__()
    outer.__exit__(None, None, None)
    try:
        got = a.capture_residual(ids).post_mlp[1]  # resid_post of layer 1
    finally:
        inner.__exit__(None, None, None)
    seen: list[torch.Tensor] = []
    handles = _reference_hooks(a.model, "steer") + [
        a.model.model.layers[1].register_forward_hook(
            lambda _m, _a, out: seen.append(out[0] if isinstance(out, tuple) else out)
        )
    ]
    try:
        with torch.no_grad():
            a.model(ids[None])
        want = seen[0][0]
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_eager_model_keeps_output_attentions_after_out_of_order_exits(llama):
    a = llama
    ids = prompt_ids()
    original = a.model.config._attn_implementation
    a.model.set_attn_implementation("eager")
    try:
        ivs = interventions()
        c1, c2 = InterventionContext(a, [ivs["scale"]]), InterventionContext(a, [ivs["ablate"]])
        c1.__enter__()
        c2.__enter__()
        c1.__exit__(None, None, None)
        c2.__exit__(None, None, None)
        assert a.model.config._attn_implementation == "eager"
        a.capture_full(ids)
        with torch.no_grad():
            out = a.model(ids[None], output_attentions=True)
        assert len(out.attentions) == a.n_layers
    finally:
        a.model.set_attn_implementation(original)


# -- 2. threads ----------------------------------------------------------------------------------
@contextmanager
def frequent_switches() -> Iterator[None]:
    """Switch threads every few microseconds so concurrent forwards really interleave."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


def run_threads(jobs: list[Callable[[], object]], repeats: int) -> list[list[object]]:
    """Run each job ``repeats`` times, all jobs in their own thread, started together."""
    barrier = threading.Barrier(len(jobs))
    results: list[list[object]] = [[] for _ in jobs]
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            barrier.wait()
            for _ in range(repeats):
                results[i].append(jobs[i]())
        except BaseException as exc:  # reported in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    with frequent_switches():
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
    return results


def tensors(obj: object, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor field of a capture, by dotted name."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    out: dict[str, torch.Tensor] = {}
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            out.update(tensors(getattr(obj, f.name), f"{prefix}.{f.name}"))
    return out


def assert_same_capture(got: object, want: object) -> None:
    a, b = tensors(got), tensors(want)
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize(("n_threads", "lengths"), [(2, "equal"), (2, "different"), (4, "mixed")])
def test_threads_capturing_different_prompts_get_single_thread_results(n_threads, lengths):
    """Before: different lengths crashed or gave patterns off by 1.0; equal lengths gave
    residuals off by thousands with no error."""
    model = tiny_model("gemma3")
    before = snapshot(model)
    a = oculi.attach(model)
    sizes = {"equal": [9, 9], "different": [6, 12], "mixed": [6, 9, 9, 12]}[lengths]
    prompts = [prompt_ids(length=n, seed=i) for i, n in enumerate(sizes)]
    single = [a.capture_full(p) for p in prompts]
    results = run_threads([lambda p=p: a.capture_full(p) for p in prompts], repeats=8)
    for want, got in zip(single, results):
        for capture in got:
            assert_same_capture(capture, want)
    assert snapshot(model) == before


def _plain(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids[None]).logits[0]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_plain_forward_beside_a_capture_is_untouched(impl):
    model = tiny_model("gemma3")
    original = model.config._attn_implementation
    model.set_attn_implementation(impl)
    try:
        a = oculi.attach(model)
        ids, other = prompt_ids(), prompt_ids(length=7, seed=9)
        # a left-padded batch too: its padding mask must survive as well as the causal one
        padded = torch.cat([torch.zeros(4, dtype=torch.long), other])[None].repeat(2, 1)
        padded[1, :4] = prompt_ids(length=4, seed=5)
        mask = torch.ones_like(padded)
        mask[0, :4] = 0

        def plain_padded() -> torch.Tensor:
            with torch.no_grad():
                return model(padded, attention_mask=mask).logits

        plain, captured, plain_pad = _plain(model, other), a.capture_full(ids), plain_padded()
        results = run_threads(
            [lambda: a.capture_full(ids), lambda: _plain(model, other), plain_padded], 10
        )
        for capture in results[0]:
            assert_same_capture(capture, captured)
        for logits in results[1]:  # the eager mask under "oculi" still gets the causal mask
            torch.testing.assert_close(logits, plain, rtol=1e-5, atol=1e-5)
        real = mask.bool()
        for logits in results[2]:
            torch.testing.assert_close(logits[real], plain_pad[real], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(plain_pad[0, 4:], plain, rtol=1e-5, atol=1e-5)  # padding held
        assert model.config._attn_implementation == impl
    finally:
        model.set_attn_implementation(original)


def test_plain_forward_beside_an_open_intervention_context_is_untouched(llama):
    a, ids = llama, prompt_ids()
    plain = _plain(a.model, ids)
    want = reference_logits(a.model, ids, ["scale", "steer"])
    ivs = interventions()
    with InterventionContext(a, [ivs["scale"], ivs["steer"]]):
        # another thread, while this one's context switches the model to "oculi"
        other = run_threads([lambda: _plain(a.model, ids)], repeats=3)[0]
        mine = a.forward(ids)
    for logits in other:
        torch.testing.assert_close(logits, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mine, want, rtol=1e-5, atol=1e-5)


def test_threads_with_their_own_contexts_see_only_their_own(llama):
    a, ids = llama, prompt_ids()
    ivs = interventions()

    def within(name: str) -> Callable[[], torch.Tensor]:
        def job() -> torch.Tensor:
            with InterventionContext(a, [ivs[name]]):
                return a.forward(ids)

        return job

    names = ["steer", "ablate", "scale"]
    results = run_threads([within(n) for n in names] + [lambda: a.forward(ids)], repeats=5)
    for name, got in zip([*names, None], results):
        want = reference_logits(a.model, ids, [name] if name else [])
        for logits in got:
            torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)


def test_asyncio_tasks_interleaving_see_only_their_own_contexts(llama):
    """Contexts follow contextvars: tasks that interleave at awaits on one thread do not see
    each other's open contexts."""
    import asyncio

    a, ids = llama, prompt_ids()
    refs = all_references(a.model, ids)
    ivs = interventions()

    async def task(name: str | None) -> list[torch.Tensor]:
        out = []
        with ExitStack() as stack:
            if name:
                stack.enter_context(InterventionContext(a, [ivs[name]]))
            for _ in range(3):
                await asyncio.sleep(0)  # the other tasks run (and open theirs) here
                out.append(a.forward(ids))
        return out

    async def main() -> list[list[torch.Tensor]]:
        return await asyncio.gather(task("steer"), task("scale"), task(None))

    for name, got in zip(["steer", "scale", None], asyncio.run(main())):
        for logits in got:
            want = refs[frozenset([name] if name else [])]
            torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)


@pytest.mark.gemma
def test_gemma_threads_capture_and_plain_forward_concurrently(gemma):
    prompts = ["The capital of France is", "Water boils at a temperature of one hundred"]
    single = [gemma.capture_full(p) for p in prompts]
    plain = gemma.forward("The Eiffel Tower is in")
    results = run_threads(
        [
            *(lambda p=p: gemma.capture_full(p) for p in prompts),
            lambda: gemma.forward("The Eiffel Tower is in"),
        ],
        repeats=2,
    )
    for want, got in zip(single, results):
        for capture in got:
            assert_same_capture(capture, want)
    for logits in results[2]:
        torch.testing.assert_close(logits, plain, rtol=1e-4, atol=1e-4)
    assert gemma.model.config._attn_implementation != "oculi"


# -- 5. overflow ---------------------------------------------------------------------------------
def test_overflow_is_caught_in_captures_that_stop_early_and_in_generation(llama):
    a, ids = llama, prompt_ids()
    huge = SpectraScaler(layer=1, head=0, alpha=1e38)
    with InterventionContext(a, [huge]):
        # the capture stops after layer 1 (no decoder output hook runs): checked at its end
        with pytest.raises(oculi.NonFiniteError, match=re.escape(f"{huge!r} overflowed q")):
            a.capture_residual(ids, oculi.ResidualConfig(layers=[1]))
        with pytest.raises(oculi.NonFiniteError, match=re.escape(repr(huge))):
            a.model.generate(ids[None], max_new_tokens=2, do_sample=False)
    # a large but representable alpha is an ordinary (very sharp) scaling
    with InterventionContext(a, [SpectraScaler(layer=1, head=0, alpha=1e4)]):
        assert bool(torch.isfinite(a.forward(ids)).all())


def test_overflow_inside_half_precision_attention_names_the_scaler():
    """In fp16 eager attention, q * alpha stays finite while q.k overflows: the layer's
    attention output is checked too."""
    model = copy.deepcopy(tiny_model("llama_gqa")).half()
    model.set_attn_implementation("eager")
    a, ids = oculi.attach(model), prompt_ids()
    sharp = SpectraScaler(layer=1, head=0, alpha=1e4)
    with (
        pytest.raises(
            oculi.NonFiniteError, match=re.escape(f"{sharp!r} overflowed the attention output of")
        ),
        InterventionContext(a, [sharp]),
    ):
        a.forward(ids)
    with pytest.raises(ValueError, match=r"alpha=100000 exceeds the largest torch.float16 value"):
        InterventionContext(a, [SpectraScaler(layer=1, head=0, alpha=1e5)])
    with InterventionContext(a, [SpectraScaler(layer=1, head=0, alpha=100.0)]):
        assert bool(torch.isfinite(a.forward(ids)).all())


def test_values_already_non_finite_are_not_blamed_on_an_intervention(llama):
    """A model that overflows by itself (here a user's hook writing inf) is not an
    intervention's fault: no NonFiniteError, the model's own output comes back."""
    a, ids = llama, prompt_ids()

    def poison(_m, _a, out):
        out = (out[0] if isinstance(out, tuple) else out).clone()
        out[..., 0] = float("inf")
        return out

    handle = a.model.model.layers[0].register_forward_hook(poison)
    try:
        with InterventionContext(a, [SteeringVector(_steer_vec(), layer=1)]):
            assert not bool(torch.isfinite(a.forward(ids)).all())
    finally:
        handle.remove()


@pytest.mark.gemma
def test_gemma_residuals_in_float16_warn_naming_the_site(gemma):
    """Gemma 3's residual stream holds values beyond float16's 65504."""
    half = oculi.ResidualConfig(layers=[8, 12], storage_dtype=torch.float16)
    with pytest.warns(oculi.StorageRangeWarning) as caught:
        residual = gemma.capture_residual("The capital of France is", half)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "'resid_post' at layers [8, 12]" in message and "float16 max 6.55e+04" in message
    exact = gemma.capture_residual("The capital of France is", oculi.ResidualConfig(layers=[8, 12]))
    assert float(exact.post_mlp.abs().max()) > 65504  # the reference: the fp32 capture
    assert torch.isinf(residual.post_mlp).any()
    bf16 = oculi.ResidualConfig(layers=[8, 12], storage_dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", oculi.StorageRangeWarning)
        gemma.capture_residual("The capital of France is", bf16)  # bf16 has fp32's range


# -- 6. gradients under inference mode -----------------------------------------------------------
def test_attribution_patching_under_inference_mode_equals_outside(llama):
    from oculi import patching

    a = llama
    clean, corrupt = prompt_ids(7, seed=1), prompt_ids(7, seed=2)
    metric = patching.logit_diff(5, 6)
    want = patching.attribution_patching(a, clean, corrupt, metric=metric, site="z")
    with torch.inference_mode():
        got = patching.attribution_patching(a, clean, corrupt, metric=metric, site="z")
        assert torch.is_inference_mode_enabled()  # the caller's mode is left as it was
    assert torch.equal(got.values, want.values)
    assert got.values.abs().sum() > 0


def test_weights_made_under_inference_mode_are_refused_for_gradients():
    from oculi import patching

    with torch.inference_mode():
        model = copy.deepcopy(tiny_model("llama_gqa"))
        for p in model.parameters():
            p.data = p.data.clone()  # inference tensors, as if loaded under inference_mode
    a = oculi.attach(model)
    with pytest.raises(oculi.InputError, match="weights were created under torch.inference_mode"):
        patching.attribution_patching(
            a, prompt_ids(7, seed=1), prompt_ids(7, seed=2), metric=patching.logit_diff(5, 6)
        )


def test_switching_the_implementation_inside_an_open_context_is_refused(llama):
    """set_attn_implementation while a context is open would silently bypass its taps."""
    a, ids = llama, prompt_ids()
    original = a.model.config._attn_implementation
    try:
        with InterventionContext(a, [interventions()["scale"]]):
            a.model.set_attn_implementation("eager")
            # refused before the forward
            with pytest.raises(RuntimeError, match=r"implementation was changed .* now reads"):
                a.forward(ids)
            with pytest.raises(RuntimeError, match=r"implementation was changed .* now reads"):
                a.capture_full(ids)

            # ... and after a forward during which it changed
            def switch(_m, _a):
                a.model.set_attn_implementation("eager")

            a.model.set_attn_implementation("oculi")
            handle = a.model.model.layers[0].register_forward_pre_hook(switch)
            try:
                with pytest.raises(RuntimeError, match=r"left by the attention of layers \[1\]"):
                    a.forward(ids)
            finally:
                handle.remove()
        assert a.model.config._attn_implementation == "eager"  # the user's choice stands
    finally:
        a.model.set_attn_implementation(original)


# -- autograd's mode ------------------------------------------------------------------------
def _switch_grad_off_as_an_interrupted_no_grad_does() -> None:
    """``torch.no_grad().__enter__`` switched autograd off and a Ctrl-C landed before it
    returned: its ``__exit__`` never runs."""
    torch.no_grad().__enter__()


def test_a_hook_set_left_by_an_error_puts_autograd_back():
    from oculi.capture.hooks import HookSet

    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            with pytest.raises(KeyboardInterrupt), HookSet():
                _switch_grad_off_as_an_interrupted_no_grad_does()
                raise KeyboardInterrupt
            assert torch.is_grad_enabled() is grad
    # on a normal exit the body's own choice stands
    with HookSet():
        torch.set_grad_enabled(False)
    assert not torch.is_grad_enabled()
    torch.set_grad_enabled(True)


def test_an_intervention_context_left_by_an_error_puts_autograd_back(llama):
    with pytest.raises(KeyboardInterrupt), InterventionContext(llama, interventions()["steer"]):
        _switch_grad_off_as_an_interrupted_no_grad_does()
        llama.model(prompt_ids()[None])
        raise KeyboardInterrupt
    assert torch.is_grad_enabled()
