"""Which features drive a prediction: each latent's direct logit attribution and its
attribution-patching score, in one call.

::

    fa = oculi.sae.feature_attribution(adapter, sae, "The Eiffel Tower is in the city of", " Paris")
    fa.top(5)                  # [(latent, AtP score), ...]: ablating it would lower the logit most
    fa.top(5, by="dla")        # [(latent, direct share of the logit), ...]

For a latent ``i`` with activation ``a_i`` at the predicting position:

- **DLA**: its write ``a_i · W_dec[i]`` projected on the target's readout through the final
  norm frozen at that position (:func:`oculi.analysis.readout.readout`), so for an SAE on the
  last layer's residual the shares, the bias ``b_dec`` and the SAE's error add up to the logit.
  Only the direct path: what later layers make of the write is not in it.
- **AtP** (attribution patching, Nanda 2023; Syed et al. 2023): the metric's gradient with
  respect to the latent, times the change of zero-ablating it, ``-a_i · ∂m/∂a_i``: the
  first-order estimate of what ablating it does, all paths included, for every latent from one
  forward and one backward. The gradient is taken with the SAE spliced *with* its error term,
  so the forward is the model's own.

:func:`latent_patching` asks the causal question between two prompts: which latents, set to
their value on a *clean* prompt inside the *corrupt* run (at one position, the SAE's error
term kept), move the metric back. Every latent gets the attribution-patching estimate
``∂m/∂a · (a_clean - a_corrupt)`` from one backward; the most promising (or the ones named)
are then patched exactly, one forward each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from oculi.capture.interrupts import enable_grad
from oculi.errors import InputError
from oculi.intervention import InterventionContext
from oculi.sae.model import SAE
from oculi.sae.splice import SAEPatch

if TYPE_CHECKING:
    from oculi.models.adapter import Adapter


@dataclass
class FeatureAttribution:
    """Per-latent attributions at one position (all ``[d_sae]``, float64).

    Attributes:
        activations: each latent's activation.
        dla: direct logit attribution of each latent (``None`` for an SAE not writing the
            residual stream).
        gradient: ``∂metric/∂a_i``.
        atp: ``-a_i · gradient``: the estimated change of the metric if the latent is ablated.
        metric: the metric's value on the clean forward.
    """

    activations: Tensor
    dla: Tensor | None
    gradient: Tensor
    atp: Tensor
    metric: float

    def top(self, k: int = 10, by: str = "atp", absolute: bool = True) -> list[tuple[int, float]]:
        """The ``k`` latents with the largest ``|atp|`` (or ``dla``, or signed with
        ``absolute=False``): ``[(latent, value), ...]``."""
        values = {"atp": self.atp, "dla": self.dla}.get(by)
        if values is None:
            raise ValueError(f"by must be 'atp' or 'dla' (with a residual-writing SAE), got {by!r}")
        key = values.abs() if absolute else values
        idx = key.topk(min(k, len(key))).indices.tolist()
        return [(i, float(values[i])) for i in idx]


class _Leaf(SAEPatch):
    """Splices with the error term and makes the latents a leaf the gradient reaches."""

    def __init__(self, sae: SAE) -> None:
        super().__init__(sae, error=True, record=True)
        self.leaves: list[Tensor] = []

    def new_activation(self, x_read: Tensor, x_write: Tensor) -> Tensor:
        a = self.sae.encode(x_read).detach()
        leaf = a.clone().requires_grad_(True)
        self.leaves.append(leaf)
        self.recorded.append(a)
        return x_write + ((leaf - a) @ self.sae.W_dec.detach()).to(x_write.device, x_write.dtype)


def _metric_of(adapter: Adapter, target: Any) -> Any:
    if isinstance(target, tuple) and len(target) == 2:
        good, bad = (adapter.to_single_token(t) for t in target)
        return lambda logits: logits[good] - logits[bad]
    t = adapter.to_single_token(target)
    return lambda logits: logits[t]


def feature_attribution(
    adapter: Adapter,
    sae: SAE,
    prompt: Any,
    target: Any,
    *,
    position: int = -1,
) -> FeatureAttribution:
    """DLA and AtP of every latent of ``sae`` for ``target``'s logit at ``position``.

    Args:
        adapter: the model.
        sae: an SAE bound to a site and layer.
        prompt: one prompt (text or token ids).
        target: a token (text or id), or a pair ``(a, b)`` for the logit difference ``a - b``.
        position: a position of the prompt (``-1``: the last).

    Raises:
        InputError: a batch instead of one prompt, a target that is not one token.
        IndexError: a position outside the prompt.

    Example::

        fa = feature_attribution(adapter, sae, "The Eiffel Tower is in", " Paris")
        fa.atp.topk(10)            # [d_sae] -> the latents whose ablation would cost most
    """
    batch = adapter.prepare(prompt)
    if batch.input_ids.shape[0] != 1:
        raise InputError("feature_attribution takes one prompt")
    n = batch.input_ids.shape[1]
    if not -n <= position < n:
        raise IndexError(f"position {position} out of range for a prompt of {n} tokens")
    pos = position % n
    metric_of = _metric_of(adapter, target)
    leaf = _Leaf(sae)
    with enable_grad(), InterventionContext(adapter, [leaf]):
        logits = adapter.model(**batch.model_kwargs(), use_cache=False).logits
        m = metric_of(logits[0, pos])
        (grad,) = torch.autograd.grad(m, leaf.leaves[0])
    a = leaf.recorded[0][0, pos].double()
    g = grad[0, pos].double()
    dla = None
    if sae.write_site in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"):
        from oculi.analysis.readout import readout

        r = readout(
            adapter.capture_residual(batch.input_ids), target_ids(adapter, target), pos, adapter
        )
        u = r.u.reshape(-1, r.u.shape[-1])[0]
        dla = a * (sae.W_dec.detach().double().to(u.device) @ u.double()).to(a.device)
    return FeatureAttribution(a.cpu(), None if dla is None else dla.cpu(), g.cpu(),
                              (-a * g).cpu(), float(m.detach()))  # fmt: skip


def target_ids(adapter: Adapter, target: Any) -> Any:
    """A token id, or a pair of ids, as :func:`oculi.analysis.readout.readout` takes them."""
    if isinstance(target, tuple) and len(target) == 2:
        return tuple(adapter.to_single_token(t) for t in target)
    return adapter.to_single_token(target)


@dataclass
class LatentPatching:
    """Latents patched from a clean run into a corrupt one (see :func:`latent_patching`).

    Attributes:
        clean_metric, corrupt_metric: the metric on each run.
        estimate: ``[d_sae]`` attribution patching, ``∂m/∂a · (a_clean - a_corrupt)`` at the
            corrupt run: every latent from one forward and one backward.
        exact: ``{latent: metric}`` of the corrupt run with that latent set to its clean value
            (the SAE spliced with its error term), for the latents asked for.
    """

    clean_metric: float
    corrupt_metric: float
    estimate: Tensor
    exact: dict[int, float]

    def top(self, k: int = 10) -> list[tuple[int, float]]:
        """The latents whose exact patch moves the metric most: ``[(latent, change), ...]``."""
        change = {i: v - self.corrupt_metric for i, v in self.exact.items()}
        return sorted(change.items(), key=lambda kv: -abs(kv[1]))[:k]


def latent_patching(
    adapter: Adapter,
    sae: SAE,
    clean: Any,
    corrupt: Any,
    target: Any,
    *,
    latents: Any = None,
    position: int = -1,
    n_exact: int = 20,
) -> LatentPatching:
    """Activation patching over latents: which latents, set to their clean values in the
    corrupt run, move ``target``'s logit (or logit difference) back.

    Args:
        adapter, sae: the model and an SAE bound to one of its sites.
        clean, corrupt: two prompts of the same length.
        target: a token, or a pair ``(a, b)`` for the logit difference.
        latents: the latents to patch exactly (default: the ``n_exact`` with the largest
            attribution-patching estimate).
        position: the position patched and read (``-1``: the last).

    Raises:
        InputError: prompts of different lengths.

    Example::

        lp = latent_patching(adapter, sae, clean, corrupt, (" Mary", " John"))
        lp.estimate.shape, lp.exact        # [d_sae]; {latent: metric} for the best estimates
    """
    n_clean, n_corrupt = (adapter.prepare(p).input_ids.shape[1] for p in (clean, corrupt))
    if n_clean != n_corrupt:
        raise InputError(
            f"clean and corrupt prompts must have the same number of tokens (got {n_clean} "
            f"and {n_corrupt}) so positions line up"
        )
    good = feature_attribution(adapter, sae, clean, target, position=position)
    bad = feature_attribution(adapter, sae, corrupt, target, position=position)
    estimate = bad.gradient * (good.activations - bad.activations)
    if latents is None:
        latents = estimate.abs().topk(min(n_exact, sae.d_sae)).indices.tolist()
    metric_of = _metric_of(adapter, target)
    exact = {}
    for i in latents:
        clamp = {int(i): float(good.activations[int(i)])}
        patch = SAEPatch(sae, error=True, clamp=clamp, positions=[position])
        with InterventionContext(adapter, [patch]):
            logits = adapter.forward(corrupt)
        exact[int(i)] = float(metric_of(logits[position]))
    return LatentPatching(good.metric, bad.metric, estimate, exact)
