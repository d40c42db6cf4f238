"""Interrupts and errors at any moment leave the model exactly as it was; nothing accumulates.

The proof is the way the problem was found: ``sys.settrace`` counts the line events of a run
(a capture, an intervention context of each kind around a forward, a patching sweep, causal
tracing, steered generation), then the run is repeated once per event with SIGINT raised at
that event, exactly as a Ctrl-C arriving there would be (``signal.raise_signal`` from the
trace function: the handler in place at that moment decides, and by default it raises
``KeyboardInterrupt`` on that line). Interrupted are: the first time each line runs inside
oculi's enter/exit functions (those that hold interrupts) and in the modules that open and
close contexts, so every line of every enter and exit; plus seeded samples of the other oculi
events and of events inside torch and transformers (random moments of the forward). After
each interrupted run:

- ``KeyboardInterrupt`` came out of the run (an interrupt is held while oculi installs or
  restores something, never lost);
- parameters and buffers hash the same, no module carries an oculi hook (told from
  transformers' own by the hook function's module, DESIGN.md §3), every config's
  ``_attn_implementation`` and every attention module's are what they were;
- oculi's tables are empty: open bridges and owners, open hook sets, forward-end checks,
  held interrupts, and the SIGINT handler is the one before the run;
- a plain forward equals the untouched model's bit for bit.

Afterwards a fresh capture gives the numbers it gave before any interrupt.

Exceptions at the wrong moment are tested too: every hook registration and attention switch
of a run fails once in turn (the enter undoes itself), a ``NoEffectWarning`` under
``-W error`` on entering, in a forward and on leaving, removal steps that fail (the others
still run) and configs refusing the switch or their value back. Finally, N contexts, captures
and sweeps leave every table oculi appends to at its size before (issue 16, item 5).
"""

from __future__ import annotations

import dis
import os
import random
import signal
import sys
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch

import oculi
from models import tiny_model, tiny_tokenizer
from oculi import patching
from oculi.capture import bridge, hooks, interrupts
from oculi.intervention import (
    ActivationPatch,
    HeadAblation,
    InterventionContext,
    NoEffectWarning,
    SpectraScaler,
    SteeringVector,
)
from test_hygiene import configs, oculi_hooks, snapshot

OCULI_DIR = os.path.dirname(oculi.__file__) + os.sep
# Events interrupted per run beyond every line of oculi: oculi events repeating a line, and
# events in torch, transformers and the standard library (random moments of the forward),
# each chosen with a fixed seed.
SAMPLE = 20
NOP = dis.opmap["NOP"]


def _with_exit(code: Any, offset: int) -> bool:
    """Whether the instruction at ``offset`` starts a ``with`` statement's normal exit
    (``LOAD_CONST None`` x3, then the call of ``__exit__``). A real SIGINT is never handled
    between the body and that call: CPython checks for signals next in ``__exit__``'s first
    instruction (protected). Measured on 3.11 with SIGALRM every 13 us over 3M ``with``
    blocks: every handler run in the caller's frame came after ``__exit__`` had run."""
    ins = [i for i in dis.get_instructions(code) if i.offset >= offset][:5]
    names = [i.opname for i in ins if i.opname != "PRECALL"]
    return (
        len(names) >= 4
        and names[:3] == ["LOAD_CONST"] * 3
        and all(i.argval is None for i in ins[:3])
        and names[3] == "CALL"
    )


# The modules whose functions open and close hook sets, bridges and contexts: each of their
# lines that a run executes is interrupted at least once.
LIFECYCLE = frozenset(
    {"hooks.py", "bridge.py", "interrupts.py", "engine.py", "context.py", "resume.py"}
    | {"writers.py", "path.py", "attribution.py", "run.py"}  # run.py: intervention/, tl/
)
PROMPT = "the eiffel tower is in the city of"


def registries() -> dict[str, int]:
    """Every table oculi adds to per context or capture, by name, with its size."""
    return {
        "bridge._ACTIVE": len(bridge._ACTIVE),
        "bridge._OWNERS": len(bridge._OWNERS),
        "bridge._FALLBACK_OF": len(bridge._FALLBACK_OF),
        "bridge._OPEN": len(bridge._OPEN.get()),
        "hooks._OPEN": len(hooks._OPEN.get()),
        "hooks._FORWARD_END": len(hooks._FORWARD_END.get()),
        "interrupts._HELD": len(interrupts._HELD),
        "interrupts._Handler.open": interrupts._Handler.open,
        "interrupts._MARKS": len(interrupts._MARKS),
    }


def attention_impls(adapter: oculi.Adapter) -> list[Any]:
    """Each attention module's implementation as the module itself reads it."""
    return [
        adapter.part(layer, adapter.anatomy.attn).config._attn_implementation
        for layer in range(adapter.n_layers)
    ]


class Baseline:
    """What the untouched model looks like, and the checks every interrupted run must pass."""

    def __init__(self, adapter: oculi.Adapter) -> None:
        self.adapter = adapter
        self.ids = tiny_tokenizer()(PROMPT, return_tensors="pt")["input_ids"]  # [1, T]
        self.snapshot = snapshot(adapter.model)
        self.impls = attention_impls(adapter)
        self.handler = signal.getsignal(signal.SIGINT)
        self.logits = self.plain_forward()
        self.capture = adapter.capture_full(self.ids)

    def plain_forward(self) -> torch.Tensor:
        with torch.no_grad():
            return self.adapter.model(self.ids).logits

    def check(self, what: str) -> None:
        model = self.adapter.model
        now = snapshot(model)
        assert oculi_hooks(model) == 0, f"{what}: oculi hooks left on the model"
        assert now["hash"] == self.snapshot["hash"], f"{what}: parameters or buffers changed"
        assert now["attn"] == self.snapshot["attn"], f"{what}: config implementation changed"
        assert attention_impls(self.adapter) == self.impls, f"{what}: attention implementation"
        assert now["hooks"] == self.snapshot["hooks"], f"{what}: hooks added or removed"
        assert now["training"] == self.snapshot["training"], f"{what}: train/eval mode changed"
        assert now["grad"] == self.snapshot["grad"], f"{what}: requires_grad changed"
        left = {k: v for k, v in registries().items() if v and k != "interrupts._MARKS"}
        assert not left, f"{what}: oculi tables not empty: {left}"
        assert signal.getsignal(signal.SIGINT) is self.handler, f"{what}: SIGINT handler"
        assert torch.is_grad_enabled(), f"{what}: autograd left disabled"
        assert torch.equal(self.plain_forward(), self.logits), f"{what}: plain forward differs"

    def check_fresh_capture(self) -> None:
        again = self.adapter.capture_full(self.ids)
        for name, tensor in self.capture.residual.tensors().items():
            assert torch.equal(again.residual.tensors()[name], tensor), name
        for name, tensor in self.capture.attention.tensors().items():
            assert torch.equal(again.attention.tensors()[name], tensor), name
        assert torch.equal(again.logits.normalized, self.capture.logits.normalized)


def traced(trace: Callable[..., Any], fn: Callable[[], Any]) -> None:
    """Run ``fn()`` with ``trace`` as the ``sys.settrace`` function; restore the previous."""
    previous = sys.gettrace()
    sys.settrace(trace)
    try:
        fn()
    finally:
        sys.settrace(previous)


class Tracer:
    """Counts the line events of a run, in oculi's modules (``own``) and elsewhere
    (``foreign``, traced only when asked: tracing every torch line is slow); with ``at``,
    raises SIGINT at the ``at``-th event of the kind asked for."""

    def __init__(self, foreign: bool = False, at: int | None = None) -> None:
        self.foreign = foreign
        self.at = at
        self.counts = {True: 0, False: 0}  # own?, -> events so far
        # per own/foreign event: (file, line, whether oculi holds an interrupt there)
        self.where: dict[bool, list[tuple[str, int, bool]]] = {True: [], False: []}

    def __call__(self, frame: Any, event: str, _arg: Any) -> Any:
        own = frame.f_code.co_filename.startswith(OCULI_DIR)
        if event == "call":
            return self if own or self.foreign else None
        if event != "line":
            return self
        i = self.counts[own]
        self.counts[own] += 1
        if self.at is None:
            file = frame.f_code.co_filename.split(os.sep)[-1]
            self.where[own].append((file, frame.f_lineno, interrupts._held_at(frame)))
        elif i >= self.at and own != self.foreign:
            if frame.f_code.co_code[frame.f_lasti] == NOP:
                # a `try:` line: the interpreter checks for signals at no NOP (and the
                # NOP lies outside every handler), so a Ctrl-C is handled at the next line
                return self
            if _with_exit(frame.f_code, frame.f_lasti):
                return self  # likewise: handled in __exit__ (see _with_exit)
            sys.settrace(None)  # one interrupt per run; the rest runs at full speed
            signal.raise_signal(signal.SIGINT)  # as a Ctrl-C here: the handler in place decides
            return None
        return self

    def run(self, fn: Callable[[], Any]) -> None:
        traced(self, fn)


def choose(where: list[tuple[str, int, bool]], seed: int) -> list[int]:
    """The oculi events to interrupt: the first time each line runs inside a protected
    (enter/exit) function or in a module that opens and closes contexts, plus a seeded sample
    of the rest (repeats of those lines, analysis, metrics)."""
    first: dict[tuple, int] = {}
    for i, (file, line, held) in enumerate(where):
        if held or file in LIFECYCLE:
            first.setdefault((file, line, held), i)
    picks = set(first.values())
    rest = [i for i in range(len(where)) if i not in picks]
    picks |= set(random.Random(seed).sample(rest, min(SAMPLE, len(rest))))
    return sorted(picks)


def interrupt_everywhere(base: Baseline, run: Callable[[], Any], seed: int = 0) -> dict:
    """Interrupt ``run`` at every line of oculi it runs and at seeded random moments of the
    rest (torch, transformers); check the model after each. Returns the counts."""
    run()  # first-call work (imports, registrations) out of the counted runs
    counting = Tracer(foreign=True)
    counting.run(run)
    base.check("the uninterrupted run")
    own = choose(counting.where[True], seed)
    n_foreign = counting.counts[False]
    foreign = sorted(random.Random(seed).sample(range(n_foreign), min(SAMPLE, n_foreign)))
    for is_foreign, picks in ((False, own), (True, foreign)):
        for at in picks:
            file, line, held = counting.where[not is_foreign][at]
            what = f"SIGINT at event {at} ({file}:{line}{', held' if held else ''})"
            with pytest.raises(KeyboardInterrupt):
                Tracer(foreign=is_foreign, at=at).run(run)
            base.check(what)
    base.check_fresh_capture()
    return {"oculi events": counting.counts[True], "interrupted": len(own) + len(foreign)}


# -- the runs -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base() -> Baseline:
    return Baseline(oculi.attach(tiny_model("llama_gqa"), tiny_tokenizer()))


def _in_context(base: Baseline, interventions: list, body: str = "forward") -> Callable:
    adapter, ids = base.adapter, base.ids

    def run() -> None:
        with InterventionContext(adapter, interventions):
            if body == "forward":
                adapter.forward(ids)
            elif body == "capture":
                adapter.capture(ids, oculi.CaptureConfig(layers=[0]))  # stops early
            else:
                adapter.model.generate(ids, max_new_tokens=3, do_sample=False)

    return run


def interventions(adapter: oculi.Adapter) -> dict[str, list]:
    d = adapter.d_model
    return {
        "spectra": [SpectraScaler(layer=1, head=2, alpha=1.5)],
        "ablation": [HeadAblation(layer=2, head=1)],
        "mean_ablation": [HeadAblation(layer=1, head=0, method="mean", reference=PROMPT)],
        "patch": [ActivationPatch("resid_pre", layer=1, position=2, value=torch.ones(d))],
        "steering": [SteeringVector(torch.ones(d) * 0.5, layer=1)],
    }


@pytest.mark.parametrize("name", ["full", "first_layer"])
def test_interrupted_captures_leave_the_model_unchanged(base: Baseline, name: str):
    adapter, ids = base.adapter, base.ids
    run = {
        "full": lambda: adapter.capture_full(ids),
        "first_layer": lambda: adapter.capture(ids, oculi.CaptureConfig(layers=[0])),
    }[name]
    counts = interrupt_everywhere(base, run)
    assert counts["interrupted"] > 20


@pytest.mark.parametrize("kind", ["spectra", "ablation", "mean_ablation", "patch", "steering"])
def test_interrupted_intervention_contexts_leave_the_model_unchanged(base: Baseline, kind: str):
    run = _in_context(base, interventions(base.adapter)[kind])
    interrupt_everywhere(base, run)


@pytest.mark.parametrize("body", ["capture", "generate"])
def test_interrupted_captures_and_generation_inside_contexts(base: Baseline, body: str):
    ivs = interventions(base.adapter)
    run = _in_context(base, ivs["spectra"] + ivs["steering"], body)
    interrupt_everywhere(base, run)


def test_interrupted_grad_mode_switches_leave_autograd_as_it_was(base: Baseline):
    """oculi's no_grad / enable_grad (every oculi module uses them): a Ctrl-C at any line
    of the switch or its undo leaves autograd enabled, as it was."""
    from oculi.capture.interrupts import enable_grad, no_grad, without_grad

    @without_grad
    def inner() -> None:
        with enable_grad():
            torch.ones(1).requires_grad_().sum().backward()

    def run() -> None:
        with no_grad():
            inner()

    counts = interrupt_everywhere(base, run)
    assert counts["interrupted"] >= 10


def test_interrupted_transformerlens_hooks_block(base: Baseline):
    """``adapter.hooks(fwd_hooks=...)`` (oculi.tl) with a module hook, a bridge tap and a site
    write, around a forward."""
    adapter, ids = base.adapter, base.ids

    def scale(x: torch.Tensor, hook: Any) -> torch.Tensor:
        return x * 0.5

    fwd = [
        ("blocks.1.hook_resid_pre", scale),
        ("blocks.1.attn.hook_z", scale),
        ("blocks.2.hook_mlp_out", scale),
    ]

    def run() -> torch.Tensor:
        with adapter.hooks(fwd_hooks=fwd):
            return adapter.forward(ids)

    assert not torch.allclose(run(), base.plain_forward()[0])  # the hooks do change it
    interrupt_everywhere(base, run)


@pytest.mark.parametrize("what", ["sweep", "tracing"])
def test_interrupted_patching_sweep_and_causal_tracing(base: Baseline, what: str):
    adapter = base.adapter
    clean, corrupt = PROMPT, "the big tree is in the city of"
    if what == "sweep":
        metric = patching.probability("paris")
        interrupt_everywhere(
            base,
            lambda: patching.activation_patching(
                adapter, clean, corrupt, site="z", metric=metric, layers=[1], progress=False
            ),
        )
    else:
        interrupt_everywhere(
            base,
            lambda: patching.causal_tracing(
                adapter, clean, "the eiffel tower", "paris", corrupt=corrupt, progress=False
            ),
        )


# -- a step of an enter that fails ---------------------------------------------------------
# The torch and transformers functions oculi's enters call to change the model.
INSTALL_STEPS = frozenset(
    {"register_forward_hook", "register_forward_pre_hook", "_attn_implementation", "register"}
)


class StepFailure:
    """Makes the ``at``-th call of an install step (counted over the run) raise, as if torch
    or transformers refused it; without ``at``, counts those calls."""

    def __init__(self, at: int | None = None) -> None:
        self.at = at
        self.count = 0

    def __call__(self, frame: Any, event: str, _arg: Any) -> Any:
        if event != "call" or frame.f_code.co_name not in INSTALL_STEPS:
            return None
        if frame.f_code.co_filename.startswith(OCULI_DIR) or not interrupts._held_at(frame):
            return None  # only steps oculi's lifecycle code takes
        if _closing(frame):
            return None  # a step of an exit that fails stays undone (tested above), the rest run
        self.count += 1
        if self.count - 1 == self.at:
            sys.settrace(None)
            raise RuntimeError(f"install step {frame.f_code.co_name} failed")
        return None

    def run(self, fn: Callable[[], Any]) -> None:
        traced(self, fn)


def _closing(frame: Any) -> bool:
    while frame is not None:
        if frame.f_code.co_name in {"remove", "__exit__", "_close", "_release", "closed"}:
            return True
        frame = frame.f_back
    return False


@pytest.mark.parametrize(
    "name", ["capture", "spectra", "ablation", "mean_ablation", "patch", "steering", "sweep"]
)
def test_every_failing_install_step_leaves_the_model_unchanged(base: Baseline, name: str):
    """Each hook registration and attention switch of a run fails once in turn (a
    ``RuntimeError`` raised as the step is called): the enter undoes what it did."""
    adapter = base.adapter
    if name == "capture":
        run: Callable[[], Any] = lambda: adapter.capture_full(base.ids)  # noqa: E731
    elif name == "sweep":
        run = lambda: patching.activation_patching(  # noqa: E731
            adapter,
            PROMPT,
            "the big tree is in the city of",
            site="z",
            metric=patching.probability("paris"),
            layers=[1],
            progress=False,
        )
    else:
        run = _in_context(base, interventions(adapter)[name])
    run()
    counting = StepFailure()
    counting.run(run)
    assert counting.count >= 3, "the run registers hooks and switches the implementation"
    for at in range(counting.count):
        with pytest.raises(RuntimeError, match="install step .* failed"):
            StepFailure(at).run(run)
        base.check(f"install step {at} failing")


# -- a Ctrl-C goes to the handler that was there -------------------------------------------
def test_a_held_interrupt_reaches_the_users_own_handler_once(base: Baseline):
    """A SIGINT arriving on the first line of an ``__exit__`` is held until the exit is done,
    then given to the handler the user installed (which here does not raise)."""
    calls: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, _frame: calls.append(signum))
    try:
        run = _in_context(base, interventions(base.adapter)["spectra"])
        counting = Tracer()
        counting.run(run)
        where = counting.where[True]
        at = next(
            i for i, (file, _, held) in enumerate(where) if file == "context.py" and held
        )  # the first line of InterventionContext.__enter__
        exits = [i for i, (file, _, held) in enumerate(where) if held and i > at]
        for event in (at, exits[-1]):
            calls.clear()
            Tracer(at=event).run(run)  # no KeyboardInterrupt: the user's handler takes it
            assert calls == [signal.SIGINT]
            assert signal.getsignal(signal.SIGINT) is not interrupts._handle
    finally:
        signal.signal(signal.SIGINT, previous)
    base.check("after the user's handler")


# -- exceptions raised by oculi's own steps ------------------------------------------------
def test_a_no_effect_warning_raised_as_an_error_on_entering_installs_nothing(base: Baseline):
    adapter, ids = base.adapter, base.ids
    ivs = interventions(adapter)["steering"] + [SpectraScaler(layer=1, head=0, alpha=1.0)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoEffectWarning)
        with (
            pytest.raises(NoEffectWarning, match="is a no-op"),
            InterventionContext(adapter, ivs, check_effect=True),
        ):
            pytest.fail("the block must not run")  # pragma: no cover
        base.check("NoEffectWarning on enter")
        # raised inside the forward (changed nothing) and on leaving (never ran)
        clean = adapter.capture_residual(ids).post_mlp[1]  # [T, d] (one prompt)
        patch = ActivationPatch("resid_post", layer=1, position=None, value=clean)
        with (
            pytest.raises(NoEffectWarning, match="changed nothing"),
            InterventionContext(adapter, [patch], check_effect=True),
        ):
            adapter.forward(ids)
            adapter.forward(ids)  # the first forward's effects are reported here
        base.check("NoEffectWarning in a forward")
        with (
            pytest.raises(NoEffectWarning, match="never ran"),
            InterventionContext(adapter, [HeadAblation(2, 0)], check_effect=True),
        ):
            adapter.capture_residual(ids, oculi.ResidualConfig(layers=[0]))
        base.check("NoEffectWarning on leaving")


def test_a_failing_removal_step_does_not_stop_the_others(base: Baseline):
    """Steps that raise while a hook set closes: every other hook and bridge is still
    removed, and the first error comes out with the later ones as notes."""
    adapter = base.adapter
    layers = adapter.layer_modules
    taps = {1: bridge.LayerTaps()}

    def fail(n: int) -> Callable[[], None]:
        def step() -> None:
            raise RuntimeError(f"step {n} failed")

        return step

    with pytest.raises(RuntimeError, match="step 2 failed") as info, hooks.HookSet() as hs:
        hs.forward(layers[0], lambda *_: None)
        hs.callback(fail(1))
        hs.enter(
            bridge.attention_bridge(adapter.attention_configs, adapter.attention_layer_ids, taps)
        )
        hs.forward_pre(layers[1], lambda *_: None)
        hs.callback(fail(2))
        hs.forward(layers[2], lambda *_: None)
        assert oculi_hooks(adapter.model) == 3 and bridge._OWNERS
    if sys.version_info >= (3, 11):  # exception notes
        assert any("step 1 failed" in note for note in info.value.__notes__)
    base.check("failing removal steps")


class _Stubborn:
    """A config whose implementation can be made to refuse a new value."""

    def __init__(self, impl: str) -> None:
        self._impl = impl
        self.refuse: set[str] = set()

    @property
    def _attn_implementation(self) -> str:
        return self._impl

    @_attn_implementation.setter
    def _attn_implementation(self, value: str) -> None:
        if value in self.refuse:
            raise RuntimeError(f"refused {value!r}")
        self._impl = value


def test_a_config_refusing_the_switch_or_its_value_back_leaves_no_owner(base: Baseline):
    adapter = base.adapter
    real = adapter.attention_configs
    stubborn = _Stubborn("sdpa")
    both = [*real, stubborn]
    stubborn.refuse = {"oculi"}
    with (
        pytest.raises(RuntimeError, match="refused 'oculi'"),
        bridge.attention_bridge(both, adapter.attention_layer_ids, {}),
    ):
        pytest.fail("the block must not run")  # pragma: no cover
    assert stubborn._attn_implementation == "sdpa"
    base.check("a config refusing the switch")
    stubborn.refuse = {"sdpa"}
    with (
        pytest.raises(RuntimeError, match="refused 'sdpa'"),
        bridge.attention_bridge(both, adapter.attention_layer_ids, {}),
    ):
        assert [c._attn_implementation for c in both] == ["oculi"] * len(both)
    base.check("a config refusing its value back")  # the real configs are restored


# -- nothing accumulates (item 5) ----------------------------------------------------------
def module_tables(model: torch.nn.Module) -> dict[str, int]:
    """Hook tables of every module, the configs' attributes, the attention registry."""
    from transformers import AttentionInterface

    sizes = {"AttentionInterface": len(AttentionInterface._global_mapping)}
    for name, module in model.named_modules():
        for table in (
            "_forward_hooks",
            "_forward_pre_hooks",
            "_forward_hooks_with_kwargs",
            "_forward_hooks_always_called",
            "_forward_pre_hooks_with_kwargs",
            "_backward_hooks",
            "_backward_pre_hooks",
        ):
            sizes[f"{name}.{table}"] = len(getattr(module, table))
        sizes[f"{name}.__dict__"] = len(module.__dict__)
    for i, config in enumerate(configs(model)):
        sizes[f"config{i}.__dict__"] = len(vars(config))
    return sizes


@pytest.mark.parametrize("what", ["contexts", "captures", "sweeps"])
def test_repeated_contexts_captures_and_sweeps_leave_every_table_as_it_was(
    base: Baseline, what: str
):
    adapter, ids = base.adapter, base.ids
    ivs = interventions(adapter)
    runs = {
        "contexts": [_in_context(base, v) for v in ivs.values()]
        + [_in_context(base, ivs["spectra"], "capture")],
        "captures": [
            lambda: adapter.capture_full(ids),
            lambda: adapter.capture(ids, oculi.CaptureConfig(layers=[0])),
        ],
        "sweeps": [
            lambda: patching.activation_patching(
                adapter,
                PROMPT,
                "the big tree is in the city of",
                site="z",
                metric=patching.probability("paris"),
                layers=[1],
                progress=False,
            )
        ],
    }[what]
    for run in runs:
        run()  # first-call registrations (transformers' attention interface) happen here
    before = {**registries(), **module_tables(adapter.model)}
    n = 30 if what != "sweeps" else 10
    for _ in range(n):
        for run in runs:
            run()
    after = {**registries(), **module_tables(adapter.model)}
    grown = {k: (before.get(k), v) for k, v in after.items() if before.get(k) != v}
    assert not grown, f"tables changed after {n} rounds: {grown}"
    base.check(f"{n} rounds of {what}")


@pytest.mark.parametrize("what", ["edges", "eap", "acdc"])
def test_interrupted_circuit_discovery(base: Baseline, what: str):
    """Exact edge patching (its sender readers and receiver writers), EAP's gradient forward
    and ACDC's resumed forwards (oculi.discovery)."""
    from oculi import discovery

    adapter = base.adapter
    clean, corrupt = PROMPT, "the big tree is in the city of"
    metric = patching.probability("paris")
    graph = discovery.Graph.from_adapter(adapter, "heads")
    edges = ["a0.h1->m1", "m0->a2.h3", "input->logits"]
    run = {
        "edges": lambda: discovery.patch_edges(adapter, graph, clean, corrupt, edges, metric),
        "eap": lambda: discovery.eap(adapter, graph, clean, corrupt, metric=metric),
        "acdc": lambda: discovery.acdc(
            adapter, discovery.Graph.from_adapter(adapter, "components"), clean, corrupt,
            threshold=0.01, metric=metric, progress=False,
        ),
    }[what]  # fmt: skip
    interrupt_everywhere(base, run)
