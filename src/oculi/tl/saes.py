"""SAELens' ``HookedSAETransformer`` entry points on any oculi model.

::

    from oculi.sae import load_sae

    sae = load_sae("path/to/sae")                            # bound to blocks.6.hook_resid_post
    logits = adapter.run_with_saes(tokens, saes=[sae])       # the site := the reconstruction
    logits, cache = adapter.run_with_cache_with_saes(tokens, saes=[sae])
    cache["blocks.6.hook_resid_post.hook_sae_acts_post"]     # [batch, pos, d_sae]

Each SAE is spliced as :class:`oculi.sae.SAEPatch` for the one forward: without its error term
by default (``use_error_term=False``, SAELens' default), so the model runs on what the SAEs
explain; with ``use_error_term=True`` the output is the model's own and the latents are still
read. The cache holds every hook ``names_filter`` picks, as :func:`~oculi.tl.run_with_cache`
records them (downstream of a splice they show its effect), plus each SAE's latents under
SAELens' name ``<hook name>.hook_sae_acts_post`` (before any edit, zero nowhere but where the
SAE gives zero). SAELens' other SAE hooks (``hook_sae_input``, ``hook_sae_recons``, ...) are not
cached: the input is the hook the SAE reads, the reconstruction ``sae.decode(acts)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from oculi.capture.structures import SAE_ACTS_SUFFIX
from oculi.errors import InputError
from oculi.intervention.context import InterventionContext
from oculi.tl.names import NamesFilter
from oculi.tl.run import run_with_cache, run_with_hooks

if TYPE_CHECKING:
    from oculi.models.adapter import Adapter
    from oculi.sae.model import SAE


def _patches(adapter: Adapter, saes: Any, use_error_term: bool, record: bool):
    """``(each SAE's latent name, its SAEPatch)``, one SAE per hook."""
    from oculi.sae.latents import bind_saes
    from oculi.sae.splice import SAEPatch

    bound, where = bind_saes(adapter, saes, "run_with_saes")
    names = [latent_name(site, layer) for layer, site, _ in where]
    if len(set(names)) != len(names):
        raise InputError(
            f"two SAEs read the same hook ({sorted(names)}); SAELens splices one SAE per hook"
        )
    return names, [SAEPatch(sae, error=use_error_term, record=record) for sae in bound]


def latent_name(site: str, layer: int) -> str:
    """SAELens' name of the latents of an SAE at oculi's ``site`` of ``layer``.

    Example::

        latent_name("resid_post", 6)   # 'blocks.6.hook_resid_post.hook_sae_acts_post'
    """
    from oculi.sae.formats import _tl_name

    return f"{_tl_name(site, layer) or f'blocks.{layer}.{site}'}{SAE_ACTS_SUFFIX}"


def run_with_saes(
    adapter: Adapter,
    input: Any,
    saes: SAE | Sequence[SAE],
    *,
    use_error_term: bool = False,
    **kwargs: Any,
) -> Any:
    """``HookedSAETransformer.run_with_saes``: one forward with each SAE spliced at its hook.

    Example::

        logits = adapter.run_with_saes("The Eiffel Tower is in", saes=[sae6])  # [1, T, d_vocab]

    Args:
        adapter: the model.
        input: as :func:`~oculi.tl.run_with_hooks` (text or token ids).
        saes: an SAE or a list, each bound to a site and layer of this model (one per hook).
        use_error_term: add each SAE's error back (the model's own output; SAELens' option).
        **kwargs: :func:`~oculi.tl.run_with_hooks`'s options (``return_type``,
            ``fwd_hooks``, ``prepend_bos``, ...).

    Raises:
        TypeError: ``saes`` holds something that is not an :class:`oculi.sae.SAE`.
        ValueError: an SAE bound to no site, or one made for another model's widths.
    """
    _, patches = _patches(adapter, saes, use_error_term, record=False)
    with InterventionContext(adapter, patches):
        return run_with_hooks(adapter, input, **kwargs)


def run_with_cache_with_saes(
    adapter: Adapter,
    input: Any,
    saes: SAE | Sequence[SAE],
    *,
    use_error_term: bool = False,
    names_filter: NamesFilter = None,
    **kwargs: Any,
) -> tuple[Any, Any]:
    """``HookedSAETransformer.run_with_cache_with_saes``: :func:`run_with_saes` and a cache.

    Example::

        logits, cache = adapter.run_with_cache_with_saes(tokens, saes=[sae6])
        cache["blocks.6.hook_resid_post.hook_sae_acts_post"]    # [batch, pos, d_sae]

    Args:
        adapter, input, saes, use_error_term: as :func:`run_with_saes`.
        names_filter: as :func:`~oculi.tl.run_with_cache`; it may also name (or accept) the
            SAEs' ``...hook_sae_acts_post`` hooks. ``None``: every default hook and every
            SAE's latents.
        **kwargs: :func:`~oculi.tl.run_with_cache`'s other options (``remove_batch_dim``,
            ``device``, ``return_cache_object``, ...).

    Returns:
        ``(output, cache)`` as :func:`~oculi.tl.run_with_cache` returns them, the cache
        holding the latents too.
    """
    names, patches = _patches(adapter, saes, use_error_term, record=True)
    model_filter, wanted = _split_filter(names_filter, set(names))
    with InterventionContext(adapter, patches):
        out, cache = run_with_cache(adapter, input, model_filter, **kwargs)
    store = cache if isinstance(cache, dict) else cache.cache_dict
    device = kwargs.get("device")
    for name, patch in zip(names, patches):
        if name not in wanted:
            continue
        acts = patch.recorded[0]  # [B, T, d_sae]: run_with_cache runs one forward
        if kwargs.get("remove_batch_dim"):
            acts = acts[0]
        store[name] = acts.to(device) if device is not None else acts
    return out, cache


def _split_filter(names_filter: NamesFilter, latents: set[str]) -> tuple[NamesFilter, set[str]]:
    """``(the filter for the model's hooks, the latent names wanted)``."""
    if names_filter is None:
        return None, latents
    if isinstance(names_filter, str):
        if names_filter in latents:
            return [], {names_filter}
        return names_filter, set()
    if callable(names_filter):
        accepts: Callable[[str], bool] = names_filter
        return names_filter, {n for n in latents if accepts(n)}
    names = list(names_filter)
    unknown = [n for n in names if n.endswith(SAE_ACTS_SUFFIX) and n not in latents]
    if unknown:
        raise InputError(
            f"names_filter names SAE latents no SAE given reads: {unknown}; the SAEs' are "
            f"{sorted(latents)}"
        )
    return [n for n in names if n not in latents], {n for n in names if n in latents}
