"""How good an SAE is, measured on held-out prompts: reconstruction, sparsity, and the model.

::

    result = oculi.sae.evaluate(adapter, sae, held_out_prompts)
    print(result.table())      # FVU, L0, dead %, CE clean / spliced / zero-ablated, recovered

- **FVU** (fraction of variance unexplained): ``Σ‖y - ŷ‖² / Σ‖y - ȳ‖²`` over every real token
  (``y`` the site the SAE writes, ``ŷ`` its reconstruction).
- **L0**: mean number of active latents per token; **dead %**: latents that never fired on
  these tokens (judge with enough tokens).
- **Cross-entropy loss recovered**: the next-token loss of the model as it is (*clean*), with
  the site replaced by the SAE's reconstruction (*spliced*: :class:`~oculi.sae.SAEPatch`
  without the error term) and with the site set to zero (*zero-ablated*);
  ``recovered = (CE_zero - CE_spliced) / (CE_zero - CE_clean)``: 1 when splicing costs
  nothing, 0 when it is as bad as deleting the site. The KL divergence from the clean
  next-token distribution to the spliced one is reported too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from oculi.capture.engine import record
from oculi.capture.interrupts import without_grad
from oculi.errors import InputError
from oculi.intervention import ActivationPatch, InterventionContext
from oculi.sae.model import SAE
from oculi.sae.splice import SAEPatch

if TYPE_CHECKING:
    from oculi.models.adapter import Adapter


@dataclass
class SAEEvaluation:
    """The numbers of :func:`evaluate` (losses in nats per token).

    ::

        result = evaluate(adapter, sae, held_out_prompts)
        result.fvu, result.l0, result.ce_recovered
        print(result.table())
    """

    n_tokens: int
    fvu: float
    l0: float
    dead_pct: float
    ce_clean: float
    ce_spliced: float
    ce_zero: float
    ce_recovered: float
    kl_spliced: float

    def table(self) -> str:
        rows = [
            ("tokens", f"{self.n_tokens:,}"), ("FVU", f"{self.fvu:.4f}"),
            ("L0", f"{self.l0:.1f}"), ("dead latents", f"{self.dead_pct:.1f}%"),
            ("CE clean", f"{self.ce_clean:.4f}"), ("CE spliced", f"{self.ce_spliced:.4f}"),
            ("CE zero-ablated", f"{self.ce_zero:.4f}"),
            ("CE loss recovered", f"{100 * self.ce_recovered:.1f}%"),
            ("KL(clean || spliced)", f"{self.kl_spliced:.4f}"),
        ]  # fmt: skip
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _batches(adapter: Adapter, prompts: list[str], batch_size: int, max_length: int):
    for i in range(0, len(prompts), batch_size):
        rows = [adapter.tokenize(p)[:max_length] for p in prompts[i : i + batch_size]]
        n = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), n, dtype=torch.long)
        mask = torch.zeros(len(rows), n, dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, : len(r)], mask[j, : len(r)] = r, 1
        yield adapter.prepare(ids, attention_mask=mask)


def _next_token_losses(logits: Tensor, batch: Any, reference: Tensor | None):
    """``(Σ CE, Σ KL(reference || logits))`` over real next-token predictions, row by row."""
    ids, mask = batch.input_ids, batch.attention_mask.bool()
    ce, kl = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    for r in range(ids.shape[0]):
        keep = mask[r, :-1] & mask[r, 1:]
        lp = torch.log_softmax(logits[r, :-1][keep].float(), -1)
        ce = ce - lp.gather(-1, ids[r, 1:][keep][:, None]).double().sum()
        if reference is not None:
            ref = torch.log_softmax(reference[r, :-1][keep].float(), -1)
            kl = kl + (ref.exp() * (ref - lp)).sum().double()
    return ce, kl


@without_grad
def evaluate(
    adapter: Adapter,
    sae: SAE,
    prompts: Any,
    *,
    batch_size: int = 4,
    max_length: int = 128,
) -> SAEEvaluation:
    """Evaluate ``sae`` spliced into ``adapter``'s model on ``prompts`` (see the module).

    Args:
        adapter: the model the SAE was trained on.
        sae: an SAE bound to a site and layer of it.
        prompts: held-out texts (a list of strings or one string).
        batch_size: prompts per forward (the logits of a batch are ``B × T × vocab``).
        max_length: tokens kept per prompt.

    Raises:
        InputError: no prompts, or no next-token prediction among them.
        ValueError: an SAE that does not fit the model's site.

    Example::

        evaluate(adapter, load_sae("path/to/sae"), held_out_prompts).ce_recovered   # 1.0: lossless
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise InputError("evaluate needs at least one prompt")
    layer, site, write_site = sae.check_model(adapter, "evaluate")
    requests = {site: [layer]} if site == write_site else {site: [layer], write_site: [layer]}
    err, sq = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    total = torch.zeros(sae.d_out, dtype=torch.float64)
    counts = torch.zeros(sae.d_sae, dtype=torch.int64)
    active = 0
    n = 0
    ce = dict.fromkeys(("clean", "spliced", "zero"), torch.zeros((), dtype=torch.float64))
    kl = torch.zeros((), dtype=torch.float64)
    n_pred = 0
    spliced = SAEPatch(sae)
    zero = ActivationPatch(write_site, layer, None, 0.0)
    for batch in _batches(adapter, prompts, batch_size, max_length):
        got = record(adapter, batch, requests)
        mask = batch.attention_mask.bool()
        x = got[site][1][:, 0][mask]  # [N, d_in] real tokens
        y = got[write_site][1][:, 0][mask]
        a = sae.encode(x)
        y_hat = sae.decode(a, x)
        err += (y.to(y_hat) - y_hat).double().square().sum().cpu()
        yd = y.double().cpu()
        sq += yd.square().sum()
        total += yd.sum(0)
        counts += (a != 0).sum(0).cpu()
        active += int((a != 0).sum())
        n += x.shape[0]
        clean = adapter.model(**batch.model_kwargs(), use_cache=False).logits
        c, _ = _next_token_losses(clean, batch, None)
        ce["clean"] = ce["clean"] + c
        with InterventionContext(adapter, [spliced]):
            logits = adapter.model(**batch.model_kwargs(), use_cache=False).logits
        c, k = _next_token_losses(logits, batch, clean)
        ce["spliced"], kl = ce["spliced"] + c, kl + k
        with InterventionContext(adapter, [zero]):
            logits = adapter.model(**batch.model_kwargs(), use_cache=False).logits
        ce["zero"] = ce["zero"] + _next_token_losses(logits, batch, None)[0]
        n_pred += int((mask[:, :-1] & mask[:, 1:]).sum())
    if n_pred == 0:
        raise InputError("evaluate: the prompts have no next-token prediction (one token each)")
    variance = sq - total.square().sum() / n
    losses = {key: float(v) / n_pred for key, v in ce.items()}
    gap = losses["zero"] - losses["clean"]
    return SAEEvaluation(
        n_tokens=n,
        fvu=float(err / variance),
        l0=active / n,
        dead_pct=100.0 * float((counts == 0).double().mean()),
        ce_clean=losses["clean"],
        ce_spliced=losses["spliced"],
        ce_zero=losses["zero"],
        ce_recovered=(losses["zero"] - losses["spliced"]) / gap if gap else float("nan"),
        kl_spliced=float(kl) / n_pred,
    )
