"""``ModelAnalyzer``: load a model once, then generate, record, lens, steer and patch (seed 002).

::

    from oculi import ModelAnalyzer

    analyzer = ModelAnalyzer()                              # Gemma 3 270M, embedded
    text, acts = analyzer.generate("The cat", max_new_tokens=20, return_activations=True)
    acts.layer_activations["model.layers.5"].shape          # [T, d_model], every token fed
    analyzer.print_logit_lens("The quick brown fox", layer_step=2)
    analyzer.plot_convergence("The quick brown fox", save_path="convergence.png")
    analyzer.generate_with_steering("Today I feel so", positive_examples=["I am so happy"],
                                    negative_examples=["I am so sad"], coefficient=1.0,
                                    layer=6)   # "Today I feel so happy with ..."

A thin facade: every number comes from oculi's adapter, captures, logit lens, interventions
and patching, so it is exactly what those compute. Activations recorded during ``generate`` are
read by hooks on the decoder layers while the model generates with its KV cache: the prompt
pass gives the prompt's positions and each later step one new position, so there is no second
forward pass. They cover every token the model was fed, i.e. the whole final sequence except
the last generated token (which is produced but never fed back).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from oculi.analyzer.causal import CausalAnalyses
from oculi.analyzer.plots import LensPlots
from oculi.analyzer.projection import Projection, project
from oculi.analyzer.records import ActivationRecord, load_records, save_records
from oculi.capture.hooks import HookSet, first_tensor
from oculi.capture.interrupts import no_grad
from oculi.errors import InputError
from oculi.models.anatomy import get_path
from oculi.models.placement import describe_placement
from oculi.models.weights import read_weight


def model_info(adapter: Any) -> dict[str, Any]:
    """The architecture facts of an adapter's model as plain values."""
    model = adapter.model
    cfg = model.config
    return {
        "model": str(getattr(cfg, "name_or_path", "") or type(model).__name__),
        "class": type(model).__name__,
        "family": adapter.anatomy.family,
        "n_layers": adapter.n_layers,
        "n_heads": adapter.n_heads,
        "n_kv_heads": adapter.n_kv_heads,
        "d_model": adapter.d_model,
        "d_head": adapter.d_head,
        "d_mlp": adapter.d_mlp,
        "d_vocab": adapter.d_vocab,
        "tokenizer_vocab": len(adapter.tokenizer) if adapter.tokenizer is not None else None,
        "context": adapter.max_positions,
        "n_params": sum(p.numel() for p in model.parameters()),
        "dtype": str(adapter.dtype).removeprefix("torch."),
        "device": str(adapter.device),
        "attn_implementation": getattr(cfg, "_attn_implementation", None),
        "tied_embeddings": bool(getattr(cfg, "tie_word_embeddings", False)),
        **describe_placement(adapter),  # device_map, offloaded, quantization
    }


class ModelAnalyzer(LensPlots, CausalAnalyses):
    """One loaded model and seed 002's analyses over it.

    The logit lens lives in :mod:`oculi.analyzer.lens`, its figures in
    :mod:`oculi.analyzer.plots`, path patching and neuron attribution in
    :mod:`oculi.analyzer.causal`.

    Args:
        model_path: ``"gemma-3-270m"`` (the embedded default), a local folder, a ``.gguf``
            file or a hub id (anything :func:`oculi.load` takes).
        device: ``"cpu"``, ``"cuda"``, ``"mps"`` (default: the best available).
        load_for_generation: ``False`` marks the analyzer as analysis-only: ``generate`` and
            ``generate_with_steering`` then refuse. (The causal-LM head is loaded either way:
            the logit lens reads it.)
        dtype: weights dtype (default: the checkpoint's own).
        adapter: an already-loaded :class:`oculi.Adapter` to wrap instead of loading.

    Example::

        analyzer = ModelAnalyzer("gemma-3-270m")
        record = analyzer.extract_activations("The Eiffel Tower is in")
        analyzer.generate("The capital of France is", max_new_tokens=5)
    """

    def __init__(
        self,
        model_path: str | os.PathLike = "gemma-3-270m",
        device: str | None = None,
        load_for_generation: bool = True,
        *,
        dtype: str | torch.dtype | None = None,
        adapter: Any = None,
    ) -> None:
        if adapter is None:
            import oculi

            adapter = oculi.load(model_path, device=device, dtype=dtype)
        self.adapter = adapter
        self.model, self.tokenizer = adapter.model, adapter.tokenizer
        self.load_for_generation = load_for_generation
        names = {id(m): n for n, m in self.model.named_modules()}
        self._layer_names = [names[id(m)] for m in adapter.layer_modules]
        self._attention_names = [
            names[id(adapter.part(i, adapter.anatomy.attn))] for i in range(adapter.n_layers)
        ]

    # -- inspection ------------------------------------------------------------------------
    def get_num_layers(self) -> int:
        """Number of decoder layers."""
        return self.adapter.n_layers

    def get_layer_names(self) -> list[str]:
        """Module names of the decoder layers (``"model.layers.0"``, ...), the keys of
        :attr:`ActivationRecord.layer_activations`."""
        return list(self._layer_names)

    def get_attention_layer_names(self) -> list[str]:
        """Module names of each layer's attention block (``"model.layers.0.self_attn"``, ...),
        seed 002's ``ModelInspector.get_attention_layer_names``."""
        return list(self._attention_names)

    def architecture_summary(self) -> dict[str, Any]:
        """Family, sizes, parameter count, dtype and device as a dict."""
        return {**model_info(self.adapter), "layer_names": self.get_layer_names()}

    def print_architecture_summary(self) -> None:
        """Print :meth:`architecture_summary` as aligned lines."""
        summary = self.architecture_summary()
        names = summary.pop("layer_names")
        width = max(len(k) for k in summary)
        for key, value in summary.items():
            print(f"{key.ljust(width)}  {value}")
        print(f"{'layers'.ljust(width)}  {names[0]} ... {names[-1]}")

    # -- generation ------------------------------------------------------------------------
    def _check_generation(self) -> None:
        if not self.load_for_generation:
            raise InputError(
                "this ModelAnalyzer was created with load_for_generation=False; create it "
                "with load_for_generation=True to generate"
            )

    def generate(
        self,
        prompt: str,
        max_new_tokens: int = 20,
        return_activations: bool = False,
        **kwargs: Any,
    ) -> str | tuple[str, ActivationRecord]:
        """Greedy continuation (``**kwargs`` go to ``model.generate``, e.g. ``do_sample``).

        Returns:
            The prompt followed by its continuation; with ``return_activations`` also an
            :class:`ActivationRecord` of every fed token's residual after each layer, recorded
            during generation (KV cache on, no second pass).
        """
        self._check_generation()
        if not return_activations:
            return prompt + self.adapter.generate(prompt, max_new_tokens=max_new_tokens, **kwargs)
        steps: list[list[torch.Tensor]] = [[] for _ in self._layer_names]
        fed: list[torch.Tensor] = []

        def keep(i: int):
            def hook(_module: Any, _args: Any, output: Any) -> None:
                steps[i].append(first_tensor(output).detach()[0].clone())

            return hook

        def keep_ids(_module: Any, args: tuple) -> None:
            fed.append(args[0].detach()[0].clone())

        with HookSet() as hooks:
            hooks.forward_pre(get_path(self.model, self.adapter.anatomy.embed), keep_ids)
            for i, layer in enumerate(self.adapter.layer_modules):
                hooks.forward(layer, keep(i))
            continuation = self.adapter.generate(prompt, max_new_tokens=max_new_tokens, **kwargs)
        ids = torch.cat(fed).cpu()
        record = ActivationRecord(
            prompt=prompt,
            tokens=self.tokenizer.convert_ids_to_tokens(ids.tolist()),
            input_ids=ids,
            layer_activations={
                name: torch.cat(s).cpu() for name, s in zip(self._layer_names, steps)
            },
            generated_text=continuation,
        )
        return prompt + continuation, record

    def generate_with_steering(
        self,
        prompt: str,
        positive_examples: list[str],
        negative_examples: list[str],
        coefficient: float = 1.0,
        layer: int | None = None,
        max_new_tokens: int = 30,
        position: int | str = -1,
    ) -> str:
        """Generate with ``coefficient * (mean(positive) - mean(negative))`` added to the
        residual leaving ``layer`` (default: the middle layer) at every position and step.

        Seed 002's meaning: ``coefficient`` multiplies the mean difference itself (for a
        coefficient relative to the residual's norm, use
        :meth:`oculi.intervention.SteeringVector.from_contrast`)."""
        from oculi.intervention import InterventionContext, SteeringVector

        self._check_generation()
        layer = self.adapter.n_layers // 2 if layer is None else layer
        vector = SteeringVector.from_contrast(
            self.adapter,
            list(positive_examples),
            list(negative_examples),
            layer=layer,
            position=position,  # type: ignore[arg-type]
            coefficient=coefficient,
            relative=False,  # seed 002's meaning: a factor on the mean difference itself
        )
        with InterventionContext(self.adapter, [vector]):
            return prompt + self.adapter.generate(prompt, max_new_tokens=max_new_tokens)

    # -- extraction and storage ------------------------------------------------------------
    def extract_activations(
        self, prompt: str, include_attention: bool = False, return_logits: bool = False
    ) -> ActivationRecord:
        """The residual leaving every layer (and optionally patterns and logits) of one prompt,
        from one forward pass through oculi's capture."""
        return self.extract_batch_activations([prompt], include_attention, return_logits)[0]

    def extract_batch_activations(
        self,
        prompts: list[str],
        include_attention: bool = False,
        return_logits: bool = False,
        batch_size: int = 8,
    ) -> list[ActivationRecord]:
        """:meth:`extract_activations` for many prompts, ``batch_size`` per padded forward;
        each record holds only its own (real) positions."""
        from oculi.capture import CaptureConfig, ResidualConfig

        if isinstance(prompts, str) or not prompts:
            raise InputError("extract_batch_activations takes a non-empty list of prompts")
        post_only = ResidualConfig(
            capture_pre_attn=False, capture_post_attn=False, capture_pre_mlp=False
        )
        attention = (
            CaptureConfig(capture_queries=False, capture_keys=False, capture_values=False)
            if include_attention
            else None
        )
        records = []
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            batch = self.adapter.prepare(chunk)
            with no_grad():
                full = self.adapter.capture_full(
                    chunk, attention=attention, residual=post_only, mlp=None, logits=None
                )
                logits = self.adapter.forward(chunk) if return_logits else None
            for row, prompt in enumerate(chunk):
                idx = batch.attention_mask[row].bool().nonzero()[:, 0]
                resid = full.residual.post_mlp[row] if len(chunk) > 1 else full.residual.post_mlp
                ids = batch.input_ids[row, idx].cpu()
                pat = None
                if attention is not None:
                    p = full.attention.patterns
                    p = p[row] if len(chunk) > 1 else p
                    pat = p[:, :, idx][..., idx]
                lg = None if logits is None else (logits[row] if len(chunk) > 1 else logits)
                records.append(
                    ActivationRecord(
                        prompt=prompt,
                        tokens=self.tokenizer.convert_ids_to_tokens(ids.tolist()),
                        input_ids=ids,
                        layer_activations={
                            n: resid[i][idx].cpu() for i, n in enumerate(self._layer_names)
                        },
                        attentions={}
                        if pat is None
                        else {n: pat[i].cpu() for i, n in enumerate(self._layer_names)},
                        logits=None if lg is None else lg[idx].cpu(),
                    )
                )
        return records

    def save_activations(
        self,
        records: ActivationRecord | list[ActivationRecord],
        path: str | os.PathLike,
        format: str | None = None,
    ) -> Path:
        """Save one record or a list. ``format`` (default: from the suffix, else safetensors):
        ``safetensors``, ``npz``, ``pt`` (tensors only, loadable without pickle), ``json``
        (metadata and shapes, no tensors) or ``pickle`` (only when asked for by name or by a
        ``.pkl`` suffix)."""
        return save_records(records, path, format)

    @staticmethod
    def load_activations(
        path: str | os.PathLike, *, allow_pickle: bool = False
    ) -> ActivationRecord | list[ActivationRecord]:
        """Load what :meth:`save_activations` wrote. Pickle files are refused unless
        ``allow_pickle=True`` (unpickling runs code from the file)."""
        return load_records(path, allow_pickle=allow_pickle)

    # -- embeddings --------------------------------------------------------------------------
    def project_embeddings(
        self,
        items: list[str] | Any,
        method: str = "pca",
        n_components: int = 2,
        *,
        layer: int | None = None,
        seed: int = 0,
        **kwargs: Any,
    ) -> Projection:
        """Project vectors to ``n_components`` (2 or 3) dimensions with PCA (scikit-learn),
        t-SNE (scikit-learn) or UMAP (umap-learn).

        Args:
            items: words (their input embeddings; each must be one token) or, with ``layer``,
                one prompt whose tokens' residuals after ``layer`` are projected; or an array
                ``[N, d]`` of vectors.
            method: ``"pca"``, ``"tsne"`` or ``"umap"``.
            n_components: 2 or 3.
            layer: project a prompt's residual stream after this layer instead.
            seed: random state of t-SNE and UMAP.
            **kwargs: passed to the reducer (``perplexity``, ``n_neighbors``, ...).
        """
        vectors, labels = self._vectors(items, layer)
        return project(vectors, labels, method, n_components, seed=seed, **kwargs)

    def _vectors(self, items: Any, layer: int | None) -> tuple[Any, list[str]]:
        if layer is not None:
            if not isinstance(items, str):
                raise InputError("with layer=, items must be one prompt string")
            rec = self.extract_activations(items)
            name = self._layer_names[self.adapter.resolve_layer(layer)]
            return rec.layer_activations[name].float().numpy(), rec.tokens
        if isinstance(items, (list, tuple)) and items and all(isinstance(w, str) for w in items):
            ids = [self.adapter.to_single_token(w) for w in items]
            emb = read_weight(get_path(self.model, self.adapter.anatomy.embed))
            return emb[ids].float().cpu().numpy(), list(items)
        array = torch.as_tensor(items).float()
        if array.dim() != 2:
            raise InputError(f"vectors must be [N, d], got shape {list(array.shape)}")
        return array.numpy(), [str(i) for i in range(array.shape[0])]
