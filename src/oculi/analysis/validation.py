"""Causal validation of found heads: ablate them, and as many random heads, and compare.

::

    heads = [(6, 1), (8, 3)]                       # e.g. the top induction heads
    result = CircuitDetection.validate(adapter, heads, "induction")
    result.effect, result.random_effects           # loss increase: found heads vs random sets
    print(result.statement)

A head found by its attention pattern is a hypothesis; ablating it tests it. ``validate`` runs
the task's loss clean, with the found heads ablated (mean or zero, through
:class:`~oculi.intervention.ablation.HeadAblation` inside an
:class:`~oculi.intervention.context.InterventionContext`: analysis itself registers no hook),
and with ``n_random`` random sets of as many other heads ablated. The effect is the loss
increase. The significance statement uses a one-sample t-test (``scipy.stats.ttest_1samp``) of
the random effects against the found effect, and the empirical rank of the found effect among
the random ones, ``(1 + #{random ≥ found}) / (1 + n_random)``.

Tasks:

* ``"induction"``: random token sequences repeated twice (after BOS where the tokenizer has
  one); the loss is the mean next-token cross-entropy on the second copy, from its second
  token on (the first is not predictable).
* ``"ioi"``: indirect object identification, ``"When Mary and John went to the store, John
  gave a drink to"`` → `` Mary``; the loss is ``-(logit(IO) - logit(S))`` at the last token,
  averaged over name pairs and templates (ablating name movers raises it).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from oculi.analysis._common import real_positions
from oculi.errors import InputError, MissingExtraError

Head = tuple[int, int]

IOI_TEMPLATES = (
    "When{a} and{b} went to the store,{b} gave a drink to",
    "When{a} and{b} got a snack at the cafe,{b} decided to give it to",
    "Then,{a} and{b} had a long argument, and afterwards{b} said to",
)
IOI_NAMES = (" Mary", " John", " Tom", " James", " Sarah", " Anna", " David", " Emma")


@dataclass(frozen=True)
class Task:
    """A behaviour to test: inputs and a loss of the model's logits (higher is worse).

    Attributes:
        name: short name.
        inputs: token ids ``[B, T]``.
        attention_mask: ``[B, T]`` or ``None``.
        logits_at: the positions whose logits the loss reads: a list of columns, or a ``[B]``
            tensor of one column per row (only these are unembedded).
        loss: ``logits at logits_at ([B, P, V] or [B, V]) -> float``.
    """

    name: str
    inputs: Tensor
    attention_mask: Tensor | None
    logits_at: Any
    loss: Callable[[Tensor], float]


def induction_task(adapter: Any, n_sequences: int = 8, period: int = 20, seed: int = 0) -> Task:
    """Repeated random tokens: ``[BOS] r r`` with ``r`` of ``period`` random ids."""
    gen = torch.Generator().manual_seed(seed)
    vocab = adapter.vocab_limit
    low = min(1000, vocab // 4)
    high = min(vocab, 20_000)
    tokens = torch.randint(low, high, (n_sequences, period), generator=gen)
    ids = torch.cat([tokens, tokens], dim=1)
    bos = getattr(adapter.tokenizer, "bos_token_id", None)
    start = 0
    if bos is not None:
        ids = torch.cat([torch.full((n_sequences, 1), bos), ids], dim=1)
        start = 1
    first = start + period + 1  # second token of the second copy
    columns = list(range(first - 1, ids.shape[1] - 1))  # they predict tokens first .. end

    def loss(logits: Tensor) -> float:
        pred = logits.float().flatten(0, 1)
        return float(torch.nn.functional.cross_entropy(pred, ids[:, first:].flatten()))

    return Task("induction", ids, None, columns, loss)


def ioi_task(adapter: Any, names: Sequence[str] = IOI_NAMES, templates=IOI_TEMPLATES) -> Task:
    """IOI prompts over name pairs and templates; loss ``-(logit(IO) - logit(S))``."""
    if adapter.tokenizer is None:
        raise InputError("the IOI task builds prompts from text: the adapter needs a tokenizer")
    ids = [adapter.to_single_token(n) for n in names]
    prompts, io, s = [], [], []
    for t in templates:
        for i in range(0, len(names) - 1, 2):
            for a, b in ((i, i + 1), (i + 1, i)):
                prompts.append(t.format(a=names[a], b=names[b]))
                io.append(ids[a])
                s.append(ids[b])
    batch = adapter.prepare(prompts)
    n_b, n_t = batch.input_ids.shape
    meta = {"attention_mask": batch.attention_mask.cpu()}
    last = real_positions(meta, n_b, n_t, [-1])[:, 0]
    rows = torch.arange(n_b)

    def loss(logits: Tensor) -> float:
        final = logits.float()  # [B, V] at each row's last token
        return -float((final[rows, io] - final[rows, s]).mean())

    return Task("ioi", batch.input_ids.cpu(), batch.attention_mask.cpu(), last, loss)


@dataclass
class ValidationResult:
    """The loss clean, with the found heads ablated, and with random heads ablated.

    Attributes:
        heads: the heads tested.
        baseline: the clean loss.
        ablated: the loss with ``heads`` ablated.
        effect: ``ablated - baseline``.
        random_effects: the effect of each random set (as many heads as ``heads``).
        random_sets: the heads of each random set.
        p_value: one-sided t-test p-value that random sets' mean effect is below ``effect``.
        empirical_p: ``(1 + #{random ≥ effect}) / (1 + n_random)``.
        significant: the t-test's p-value is below ``alpha`` and the found effect beats every
            random draw (the smallest empirical p that ``n_random`` draws allow, or ``alpha``).
        statement: one sentence saying what was found.

    Example::

        result = CircuitDetection.validate(adapter, [(1, 0), (2, 3)], "induction")
        result.effect, result.p_value, result.significant
        print(result.statement)
    """

    task: str
    method: str
    heads: list[Head]
    baseline: float
    ablated: float
    effect: float
    random_effects: list[float]
    random_sets: list[list[Head]] = field(repr=False)
    p_value: float
    empirical_p: float
    significant: bool
    statement: str


def _loss_with(adapter: Any, task: Task, heads: Sequence[Head], method: str) -> float:
    from oculi.intervention.ablation import HeadAblation
    from oculi.intervention.run import run_with_interventions

    ablations = [HeadAblation(layer, head, method) for layer, head in heads]  # type: ignore[arg-type]
    batch = adapter.prepare(task.inputs, attention_mask=task.attention_mask)
    out = run_with_interventions(adapter, batch, ablations, logits_at=task.logits_at)
    assert out.logits is not None
    return task.loss(out.logits)


def _check_heads(adapter: Any, heads: Any) -> list[Head]:
    out = []
    for item in heads:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise InputError(f"heads must be (layer, head) pairs, got {item!r}")
        out.append((adapter.resolve_layer(int(item[0])), adapter.resolve_head(int(item[1]))))
    if not out or len(set(out)) != len(out):
        raise InputError(f"heads must be a non-empty list of distinct (layer, head), got {heads!r}")
    return out


def _task_of(adapter: Any, task: str | Task) -> Task:
    if isinstance(task, Task):
        return task
    builders: dict[str, Callable[[Any], Task]] = {"induction": induction_task, "ioi": ioi_task}
    if task not in builders:
        raise InputError(f"task must be one of {sorted(builders)} or a Task, got {task!r}")
    return builders[task](adapter)


def validate(
    adapter: Any,
    heads: Sequence[Head],
    task: str | Task = "induction",
    *,
    method: str = "mean",
    n_random: int = 10,
    seed: int = 0,
    alpha: float = 0.01,
) -> ValidationResult:
    """Ablate ``heads`` and ``n_random`` random sets of as many heads; compare the loss.

    Example::

        scores = CircuitDetection.detect_induction_heads(capture)       # repeated tokens
        heads = [tuple(h) for h in (scores > 0.5).nonzero().tolist()]
        result = CircuitDetection.validate(adapter, heads, "induction", method="mean")
        print(result.statement)

    Args:
        adapter: the model's adapter.
        heads: ``[(layer, head), ...]`` to test (distinct).
        task: ``"induction"``, ``"ioi"`` or a :class:`Task` (see the module docstring).
        method: ``"mean"`` (each head's ``z`` replaced by its mean over the prompt's real
            positions) or ``"zero"``.
        n_random: how many random sets of ``len(heads)`` other heads to ablate (at least 2).
        seed: seeds the random draws.
        alpha: significance level of the statement.

    Returns:
        :class:`ValidationResult`, with ``.statement`` saying what was found.

    Raises:
        InputError: an unknown task or method, repeated heads, too few heads to draw from.
        LayerIndexError, IndexError: a head outside the model.
    """
    try:
        from scipy import stats
    except ImportError:  # pragma: no cover - the stats extra (and dev) install scipy
        raise MissingExtraError(
            "validate uses SciPy; install with `pip install 'oculi[stats]'`"
        ) from None
    if method not in ("mean", "zero"):
        raise InputError(f"method must be 'mean' or 'zero', got {method!r}")
    if isinstance(n_random, bool) or not isinstance(n_random, int) or n_random < 2:
        raise InputError(f"n_random must be an int >= 2, got {n_random!r}")
    found = _check_heads(adapter, heads)
    task = _task_of(adapter, task)
    pool = [
        (layer, h)
        for layer in range(adapter.n_layers)
        for h in range(adapter.n_heads)
        if (layer, h) not in found
    ]
    if len(pool) < len(found):
        raise InputError("too few other heads to draw random sets of the same size")
    baseline = _loss_with(adapter, task, [], method)
    ablated = _loss_with(adapter, task, found, method)
    rng = random.Random(seed)
    sets = [sorted(rng.sample(pool, len(found))) for _ in range(n_random)]
    effects = [_loss_with(adapter, task, s, method) - baseline for s in sets]
    effect = ablated - baseline
    test = stats.ttest_1samp(effects, popmean=effect, alternative="less")
    p_value = float(test.pvalue)
    empirical = (1 + sum(e >= effect for e in effects)) / (1 + n_random)
    significant = bool(p_value < alpha and empirical <= max(alpha, 1 / (1 + n_random)))
    mean = sum(effects) / n_random
    spread = float(torch.tensor(effects).std())
    verdict = (
        "matter more than random heads"
        if significant
        else "are not distinguishable from random heads"
    )
    statement = (
        f"{task.name}: {method}-ablating the {len(found)} found head(s) changes the loss by "
        f"{effect:+.3f}; {n_random} random sets of {len(found)}: {mean:+.3f} ± {spread:.3f} "
        f"(max {max(effects):+.3f}); t-test p = {p_value:.2g}, empirical p = {empirical:.2g}: "
        f"the found heads {verdict} (alpha = {alpha})"
    )
    return ValidationResult(
        task.name,
        method,
        found,
        baseline,
        ablated,
        effect,
        effects,
        sets,
        p_value,
        empirical,
        significant,
        statement,
    )


def ioi_heads(
    adapter: Any,
    clean: str,
    corrupt: str,
    io: str | int,
    s: str | int,
    *,
    k: int = 3,
    senders: Sequence[Head] | None = None,
) -> dict[str, Any]:
    """Name mover and S-inhibition heads of one IOI prompt, by path patching (Wang et al. 2022).

    Example::

        found = CircuitDetection.ioi_heads(
            adapter,
            "When Mary and John went to the store, John gave a drink to",
            "When Mary and John went to the store, Tom gave a drink to",
            io=" Mary", s=" John")
        found["name_movers"], found["s_inhibition"]

    The metric is ``logit(io) - logit(s)``; the corrupt prompt replaces the repeated subject, so
    heads that carry "which name was repeated" lose it. **Name movers** are the ``k`` heads
    whose direct path into the logits carries the most of the metric (path patching with
    ``receivers=None``); **S-inhibition** heads the ``k`` earlier heads whose path into the name
    movers' queries carries the most (``receiver_input="q"``).

    Returns:
        ``{"name_movers": [(layer, head)], "s_inhibition": [(layer, head)],
        "direct": PatchingResult, "via_queries": PatchingResult}``; drops are
        ``clean_metric - values`` (positive: the head supports ``io``).
    """
    from oculi import patching

    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InputError(f"k must be a positive int, got {k!r}")
    metric = patching.logit_diff(io, s)
    direct = patching.path_patching(
        adapter, clean, corrupt, metric=metric, senders=senders, progress=False
    )
    movers = _top_drops(direct.clean_metric - direct.values, k)
    first = min(layer for layer, _ in movers)
    early = [(layer, h) for layer, h in (senders or _all_heads(adapter)) if layer < first]
    if not early:
        return {"name_movers": movers, "s_inhibition": [], "direct": direct, "via_queries": None}
    via = patching.path_patching(
        adapter,
        clean,
        corrupt,
        metric=metric,
        receivers=movers,
        receiver_input="q",
        senders=early,
        progress=False,
    )
    inhibition = _top_drops(via.clean_metric - via.values, k)
    return {"name_movers": movers, "s_inhibition": inhibition, "direct": direct, "via_queries": via}


def _all_heads(adapter: Any) -> list[Head]:
    return [(layer, h) for layer in range(adapter.n_layers) for h in range(adapter.n_heads)]


def _top_drops(drop: Tensor, k: int) -> list[Head]:
    flat = torch.nan_to_num(drop.flatten(), nan=-float("inf"))
    n_heads = drop.shape[1]
    return [divmod(int(i), n_heads) for i in flat.topk(min(k, flat.numel())).indices]
