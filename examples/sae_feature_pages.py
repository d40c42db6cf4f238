"""Two feature pages of the Gemma SAE trained by examples/sae_gemma.py (run after it).

Run: ``.venv/bin/python examples/sae_feature_pages.py WORK`` with WORK the folder given to
sae_gemma.py. Prints (and writes to WORK/feature_pages.json) each page: density, top contexts
and the tokens the latent's decoder direction promotes and suppresses.
"""

import json
import sys
from pathlib import Path

import oculi
from oculi.sae import load_sae, logit_effects, top_activations

work = Path(sys.argv[1])
adapter = oculi.load(device="cpu")
store = oculi.open_harvest(work / "store")
sae = load_sae(work / "sae")
n = len(store.index)
rows = (0, min(n, 300_000))
feats = top_activations(store, sae, k=12, rows=rows)
dens = feats.density
tok = adapter.tokenizer
# two latents chosen by rule, not by eye: the live latents whose top-12 contexts fire on the
# most often repeated centre token (a token-level feature) and on the most distinct ones
# (a context-level feature), among latents with density between 1e-4 and 1e-2
cands = [i for i in range(sae.d_sae) if 1e-4 <= float(dens[i]) <= 1e-2]


def centres(i):
    return [c.token_ids[c.center] for c in feats.contexts(i, window=0)]


scored = []
for i in cands[:800]:
    cs = centres(i)
    if len(cs) >= 8:
        scored.append((max(cs.count(t) for t in set(cs)) / len(cs), len(set(cs)), i))
scored.sort()
picks = [scored[-1][2], scored[0][2]]
out = {"rows_read": rows[1], "tokens": feats.n_tokens, "latents": []}
for i in picks:
    ctxs = feats.contexts(i, window=8, n=6)
    promoted, suppressed = logit_effects(adapter, sae, i, context=ctxs[0], k=8)
    page = {
        "latent": i,
        "density": float(dens[i]),
        "contexts": [
            {
                "activation": round(c.activation, 2),
                "before": tok.decode(c.token_ids[: c.center]),
                "token": tok.decode([c.token_ids[c.center]]),
                "after": tok.decode(c.token_ids[c.center + 1 :]),
            }
            for c in ctxs
        ],
        "promoted": [(tok.decode([t]), round(v, 3)) for t, v in promoted],
        "suppressed": [(tok.decode([t]), round(v, 3)) for t, v in suppressed],
    }
    out["latents"].append(page)
print(json.dumps(out, indent=1, ensure_ascii=False))
(work / "feature_pages.json").write_text(json.dumps(out, indent=1, ensure_ascii=False))
