"""One self-contained HTML page that explains a model's next-token prediction.

::

    import oculi
    from oculi.visualize.report import write_report
    adapter = oculi.load()
    write_report(adapter, "The Eiffel Tower is located in the city of", "report.html")

The page shows the top next tokens; the logit lens (each layer's prediction at every
position, and the answer's probability layer by layer); which layers, heads and MLPs write
the answer into the residual stream (direct logit attribution); the attention patterns of
the heads that matter most, with a head picker and token hover; and a causal-tracing grid
(noise on the subject, one clean state restored at a time); with a contrasting ``corrupt``
prompt, the circuit that carries the answer (EAP-IG over the heads graph, the smallest circuit
keeping 80% of the difference, by exact edge patching). Everything — data, styles,
script — is inline: it opens offline, from a file or an e-mail attachment.

Cost: one forward pass that captures what the sections need, plus the causal-tracing sweep
(which dominates: ``samples`` noisy runs over layers × positions).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from oculi.analysis.attribution import AttributionMethods
from oculi.analysis.logit_lens import LogitLensResult
from oculi.capture.configs import CaptureConfig, LogitConfig, ResidualConfig
from oculi.capture.io.files import write_text
from oculi.errors import FileWriteError, InputError
from oculi.patching.tracing import TracingResult, causal_tracing
from oculi.visualize import views
from oculi.visualize.html import esc, script, style

LENS_TOP_K = 5
# attention heads whose patterns the page carries (the picker offers these), and a budget of
# pattern entries (about 6 bytes each) that keeps long prompts' pages small
MAX_HEADS = 32
MAX_PATTERN_VALUES = 400_000


@dataclass
class ReportData:
    """Everything the page shows, computed by :func:`build_report`."""

    model: str
    prompt: str
    tokens: list[str]
    target: str
    target_id: int
    predicted: str
    top: list[tuple[str, float]]
    lens_top: list[list[list[tuple[str, float]]]]
    lens: LogitLensResult
    heads: list[tuple[str, str, torch.Tensor]]
    tracing: TracingResult
    attribution: Any
    layers: list[int] = field(default_factory=list)
    samples: int = 0
    seconds: float = 0.0
    circuit: tuple[Any, Any] | None = None  # (CircuitScores, Circuit) with a corrupt prompt


def default_subject(adapter: Any, prompt: str) -> str:
    """The text a report corrupts when no subject is given: every token but the last.

    Restoring states then shows where, layer by layer, the context's information is read
    into the final position. Pass ``subject=`` to corrupt only the subject of a fact.
    """
    enc = adapter.tokenizer(prompt, return_offsets_mapping=True)
    spans = [(a, b) for a, b in enc["offset_mapping"] if b > a]
    if not spans:
        raise InputError(f"the prompt {prompt!r} has no text token to explain")
    end = spans[-2][1] if len(spans) > 1 else spans[-1][1]
    return prompt[spans[0][0] : end]


def _decode(tokenizer: Any, ids: list[int]) -> list[str]:
    """Each token as text; whitespace-only tokens as their ``repr`` so they stay visible."""
    texts = [tokenizer.decode([i]) for i in ids]
    return [t if t.strip() else repr(t) for t in texts]


def _rank_heads(full: Any, attribution: Any) -> list[tuple[str, str, Any]]:
    """Heads by ``|direct logit attribution|``, largest first, with their patterns."""
    attn = full.attention
    score = attribution.heads.float()
    n = attn.patterns.shape[-1]
    keep = min(MAX_HEADS, max(1, MAX_PATTERN_VALUES // (n * (n + 1) // 2)))
    order = score.abs().flatten().argsort(descending=True)[:keep].tolist()
    n_heads = score.shape[1]
    out = []
    for flat in order:
        i, h = divmod(flat, n_heads)
        layer = attn.layers[i]
        label = f"L{layer} H{h} (DLA {float(score[i, h]):+.2f})"
        out.append((f"{layer}.{h}", label, attn.patterns[i, h]))
    return out


def build_report(
    adapter: Any,
    prompt: str,
    *,
    target: str | int | None = None,
    subject: str | None = None,
    samples: int = 5,
    top_k: int = 10,
    corrupt: str | None = None,
) -> ReportData:
    """Run what the report shows. See :func:`write_report` for the arguments."""
    start = time.perf_counter()
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError(f"the report explains one prompt (a non-empty string), got {prompt!r}")
    tok = adapter.tokenizer
    full = adapter.capture_full(
        prompt,
        attention=CaptureConfig(
            capture_queries=False, capture_keys=False, capture_values=False,
            capture_patterns=True, capture_head_contributions=True,
        ),
        residual=ResidualConfig(capture_attn_out=True, capture_mlp_out=True),
        mlp=None,
        logits=LogitConfig(top_k=LENS_TOP_K),
    )  # fmt: skip
    lc = full.logits
    ids = full.metadata["input_ids"][0]
    tokens = _decode(tok, ids)
    # the last layer's lens is the model's own output distribution
    final = torch.softmax(lc.logits(lc.layers[-1], [len(ids) - 1])[0].float(), dim=-1)
    final_p, final_i = final.topk(top_k)
    top = list(zip(_decode(tok, final_i.tolist()), final_p.tolist()))
    target_id = int(final_i[0]) if target is None else adapter.to_single_token(target)
    lens = LogitLensResult.from_capture(lc, target_id, tokenizer=tok)
    k_ids, k_probs = lc.top_k_indices[..., :LENS_TOP_K], lc.top_k_probs[..., :LENS_TOP_K]
    lens_top = [
        [
            list(zip(_decode(tok, k_ids[l_, t].tolist()), k_probs[l_, t].tolist()))
            for t in range(len(ids))
        ]
        for l_ in range(len(lc.layers))
    ]
    attribution = AttributionMethods.direct_logit_attribution(
        full, target_id, position=-1, adapter=adapter
    )
    tracing = causal_tracing(
        adapter, prompt, subject if subject is not None else default_subject(adapter, prompt),
        target_id, samples=samples, progress=False,
    )  # fmt: skip
    circuit = None if corrupt is None else _circuit(adapter, prompt, corrupt, target_id)
    return ReportData(
        model=str(full.metadata.get("model", type(adapter.model).__name__)),
        prompt=prompt,
        tokens=tokens,
        target=tok.decode([target_id]),
        target_id=target_id,
        predicted=top[0][0],
        top=top,
        lens_top=lens_top,
        lens=lens,
        heads=_rank_heads(full, attribution),
        tracing=tracing,
        attribution=attribution,
        layers=list(lc.layers),
        samples=samples,
        seconds=time.perf_counter() - start,
        circuit=circuit,
    )


def _circuit(adapter: Any, prompt: str, corrupt: str, target_id: int) -> tuple[Any, Any]:
    """EAP-IG on the heads graph for ``target − the corrupt prompt's top token`` (the target's
    logit when both predict it), and its smallest circuit keeping 80%."""
    from oculi import discovery, patching

    rival = int(adapter.forward(corrupt)[-1].argmax())
    metric = (
        patching.logit(target_id) if rival == target_id else patching.logit_diff(target_id, rival)
    )
    graph = discovery.Graph.from_adapter(adapter, "heads")
    scores = discovery.eap_ig(adapter, graph, prompt, corrupt, metric=metric, steps=5)
    return scores, scores.circuit(recover=0.8)


def _section(title: str, note: str, body: str, anchor: str) -> str:
    return (
        f'<section id="{anchor}"><h2>{esc(title)}</h2><p class="oc-note">{note}</p>{body}</section>'
    )


def render(data: ReportData) -> str:
    """The report page for ``data``, as one HTML string."""
    from oculi import __version__

    p_target = dict(data.top).get(data.target)
    head = (
        f'<h1>Why does the model predict <span class="oc-pred oc-tok">{esc(data.predicted)}'
        f'</span>?</h1><div class="oc-meta">{esc(data.model)} · prompt '
        f'<span class="oc-tok">{esc(data.prompt)}</span> · {len(data.tokens)} tokens</div>'
    )
    target_note = (
        f'The sections below follow <span class="oc-tok">{esc(data.target)}</span>'
        + (f" (p = {p_target:.3f})" if p_target is not None else "")
        + "."
    )
    sections = [
        _section(
            "Next token",
            f"The model's distribution over the next token, top {len(data.top)}. {target_note}",
            views.top_tokens_view(data.top),
            "top",
        ),
        _section(
            "Logit lens",
            "Each layer's residual stream read through the final norm and the unembedding, as "
            "if that layer were the last. Cells show each layer's top-1 next token at each "
            "position, shaded by its probability; hover a cell for its top "
            f"{LENS_TOP_K}.",
            views.lens_result_view(data.lens)
            + views.lens_grid_view(data.tokens, data.layers, data.lens_top),
            "lens",
        ),
        _section(
            "Direct logit attribution",
            "What the embedding, each layer's attention and MLP, and each attention head write "
            f"into the logit of {esc(repr(data.target))} at the last position (blue raises it, "
            "red lowers it; the final norm's scale is frozen at its actual value, so the shares "
            "add up to the logit). Click a head to see its pattern below.",
            views.attribution_view(data.attribution, data.layers),
            "dla",
        ),
        _section(
            "Attention of the heads that matter most",
            "Pick a head (ranked by |direct logit attribution|); hover a token to colour every "
            "token by the attention it receives from that one.",
            views.attention_view(data.heads, data.tokens),
            "attention",
        ),
        _section(
            "Causal tracing",
            "Gaussian noise on the embeddings of the tokens marked * (3 × the embedding standard "
            f"deviation, averaged over {data.samples} samples) removes the answer; restoring one "
            "clean residual state at a time shows which (layer, position) carries it.",
            views.tracing_view(data.tracing),
            "tracing",
        ),
    ]
    if data.circuit is not None:
        scores, circuit = data.circuit
        sections.append(
            _section(
                "Circuit",
                "Which edges between the embedding, the heads and the MLPs carry the answer over "
                f"the contrasting prompt ({esc(scores.patcher.metric.name)}): every edge scored "
                "by EAP-IG, then the smallest set of best edges whose exact patching keeps 80% of "
                "the difference.",
                views.circuit_view(scores, circuit),
                "circuit",
            )
        )
    foot = (
        f'<p class="oc-meta">oculi {esc(__version__)} · computed in {data.seconds:.1f} s · '
        "self-contained page: no network needed</p>"
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>oculi report: {esc(data.prompt)}</title><style>{style()}"
        "body{max-width:1100px;margin:24px auto;padding:0 16px}</style></head>"
        f'<body class="oculi">{head}{"".join(sections)}{foot}<script>{script()}</script></body></html>'
    )


def write_report(
    adapter: Any,
    prompt: str,
    path: str | Path,
    *,
    target: str | int | None = None,
    subject: str | None = None,
    samples: int = 5,
    corrupt: str | None = None,
) -> Path:
    """Write the report page for ``prompt`` to ``path``; returns the path.

    Example::

        write_report(oculi.load(), "The Eiffel Tower is located in the city of", "report.html",
                     subject="The Eiffel Tower")

    Args:
        adapter: the model's adapter (``oculi.load()``).
        prompt: one prompt.
        path: the ``.html`` file to write (its folder is created).
        target: the token to explain (default: the model's top prediction).
        subject: the substring of ``prompt`` that causal tracing corrupts (default: every
            token but the last; see :func:`default_subject`).
        samples: noise samples of the causal tracing.
        corrupt: a contrasting prompt of the same token length; adds the circuit section.

    Raises:
        InputError: an empty prompt, a target of several tokens, a subject not in the prompt.
        FileWriteError: ``path`` is a folder or cannot be written (full disk...); an existing
            page is then left as it was (the page is written whole or not at all).
    """
    if Path(path).expanduser().is_dir():
        raise FileWriteError(
            f"cannot save the report to '{path}': it is a folder; give a file name"
        )
    data = build_report(
        adapter, prompt, target=target, subject=subject, samples=samples, corrupt=corrupt
    )
    out = Path(path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    return write_text(out, render(data), what="the report")
