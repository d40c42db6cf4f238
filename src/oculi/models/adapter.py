"""The adapter: one object that reads a Hugging Face decoder through its anatomy.

::

    adapter = oculi.attach(model, tokenizer)        # or oculi.load("gemma-3-270m")
    capture = adapter.capture("The capital of France is")
    capture.patterns.shape                          # [L, H, T, T]

An adapter never modifies the model: every capture registers its hooks inside a context that
removes them in ``finally``, and the attention implementation it switches to is restored
there too. Sizes (``n_layers``, ``n_heads``, ``n_kv_heads``, ``d_model``, ``d_head``, ``d_mlp``,
``d_vocab``) are read from the modules themselves, so they are right even where configs
disagree.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, ClassVar, cast

import torch
from torch import nn

from oculi.capture.assemble import build_full_capture
from oculi.capture.configs import CaptureConfig, LogitConfig, MLPConfig, ResidualConfig
from oculi.capture.inputs import Batch, Inputs, prepare_batch
from oculi.capture.interrupts import no_grad
from oculi.capture.lens import LogitCapture
from oculi.capture.memory import record_planned
from oculi.capture.sites import check_kind
from oculi.capture.structures import AttentionCapture, FullCapture, MLPCapture, ResidualCapture
from oculi.errors import InputError, LayerIndexError, UnsupportedArchitectureError
from oculi.models.anatomy import Anatomy, anatomy_for, get_path
from oculi.models.generation import generate_ids
from oculi.models.weights import execution_device, read_bias, read_weight, weight_shape

Storage = tuple[torch.dtype | None, "str | torch.device | None"]


class Adapter:
    """Reads one Hugging Face causal LM through its family's :class:`Anatomy`.

    Args:
        model: a ``*ForCausalLM`` module (put in eval mode by the caller; oculi does not
            change it).
        tokenizer: its tokenizer, needed for string inputs.
        anatomy: override the registered anatomy.

    Raises:
        UnsupportedArchitectureError: no anatomy for the model, or one for another family
            than this adapter class handles.
        InputError: (a ``ValueError``) a tokenizer whose vocabulary is larger than the
            model's embedding.

    Usually made by :func:`oculi.load` or :func:`oculi.attach`::

        adapter = oculi.attach(model, tokenizer)       # any supported *ForCausalLM
        adapter.n_layers, adapter.n_heads, adapter.d_model
        adapter.capture_residual("Hello there").pre_attn.shape   # [L, T, d_model]
    """

    anatomy: Anatomy
    #: families a family-specific subclass accepts (None: any registered family)
    families: ClassVar[tuple[str, ...] | None] = None

    def __init__(self, model: nn.Module, tokenizer: Any = None, *, anatomy: Anatomy | None = None):
        found = anatomy or anatomy_for(model)
        expected = type(self).__dict__.get("anatomy")
        allowed = self.families or ((expected.family,) if isinstance(expected, Anatomy) else None)
        if allowed is not None and found.family not in allowed:
            raise UnsupportedArchitectureError(
                f"{type(self).__name__} handles {', '.join(allowed)} models, but this is a "
                f"{found.family!r} model ({type(model).__name__}); use oculi.attach(model, "
                "tokenizer), which picks the right family"
            )
        self.anatomy = found
        self.model = model
        self.tokenizer = tokenizer
        # the layers path names a ModuleList; get_path is typed for any module
        self.layer_modules: list[nn.Module] = list(
            cast(nn.ModuleList, get_path(model, found.layers))
        )
        self.decoder: nn.Module = get_path(model, found.decoder)
        self._read_sizes()
        self._check_tokenizer()
        attn = [self.part(i, found.attn) for i in range(self.n_layers)]
        self.attention_layer_ids = {id(m): i for i, m in enumerate(attn)}
        configs = {id(model.config): model.config, id(self.decoder.config): self.decoder.config}
        for m in attn:
            if getattr(m, "config", None) is not None:
                configs[id(m.config)] = m.config
        self.attention_configs = list(configs.values())

    # -- anatomy access ------------------------------------------------------------------
    def part(self, layer: int, path: str) -> nn.Module:
        """The module at ``path`` inside decoder layer ``layer``."""
        return get_path(self.layer_modules[layer], path)

    def module(self, path: str) -> nn.Module:
        """The module at ``path`` of the whole model (``adapter.module(anatomy.final_norm)``)."""
        return get_path(self.model, path)

    def _read_sizes(self) -> None:
        cfg: Any = self.model.config  # a transformers config: attributes vary by family
        anat = self.anatomy
        self.n_layers = len(self.layer_modules)
        self.n_heads = int(cfg.num_attention_heads)
        self.n_kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.n_heads)
        self.d_model = int(cfg.hidden_size)
        self.d_head = int(getattr(cfg, "head_dim", None) or self.d_model // self.n_heads)
        # shapes only: an offloaded weight is a meta placeholder, a 4-bit one is packed
        down = weight_shape(self.part(0, f"{anat.mlp}.{anat.down_proj}"))
        self.d_mlp = int(down[0] if anat.conv1d else down[1])
        self.d_vocab = int(weight_shape(get_path(self.model, anat.unembed))[0])
        self.max_positions = getattr(cfg, "max_position_embeddings", None)

    def _check_tokenizer(self) -> None:
        tok = self.tokenizer
        if tok is None:
            self.vocab_limit = self.d_vocab
            return
        n = len(tok)
        if n > self.d_vocab:
            raise InputError(
                f"tokenizer has {n} tokens but the model's embedding has {self.d_vocab} rows "
                f"(a tokenizer for it has at most {self.d_vocab}): they do not belong together "
                "(load the tokenizer from the same checkpoint)"
            )
        # token ids at or past len(tokenizer) hit padded embedding rows that were never trained
        self.vocab_limit = n

    @property
    def device(self) -> torch.device:
        """Where the model takes its inputs: the embedding's execution device (with a
        ``device_map``, layers may run elsewhere; offloaded ones on their hook's device)."""
        return execution_device(get_path(self.model, self.anatomy.embed))

    @property
    def dtype(self) -> torch.dtype:
        """The model's compute dtype: its first floating-point parameter's (a quantized
        model's integer storage is not it)."""
        for p in self.model.parameters():
            if p.is_floating_point():
                return p.dtype
        return cast(torch.dtype, getattr(self.model, "dtype", torch.float32))

    def unembedding(self) -> tuple[torch.Tensor, torch.Tensor | None, float | None]:
        """``(W_U [V, d], bias or None, final soft-cap or None)``: shared with the model where
        it is a plain parameter, read from the offload storage or dequantized otherwise
        (:func:`oculi.models.weights.read_weight`)."""
        head = get_path(self.model, self.anatomy.unembed)
        attr = self.anatomy.final_softcap_attr
        cap = getattr(self.model.config, attr, None) if attr else None
        return read_weight(head), read_bias(head), cap

    def final_norm_bias(self) -> torch.Tensor:
        """The final norm's additive bias ``[d]`` (a LayerNorm's), zeros when it has none."""
        bias = read_bias(self.module(self.anatomy.final_norm))
        if bias is not None:
            return bias
        return torch.zeros(self.d_model, device=self.device, dtype=self.dtype)

    # -- validation ----------------------------------------------------------------------
    def resolve_layer(self, layer: int) -> int:
        """Normalise a layer index (negatives count from the end) or raise ``LayerIndexError``."""
        if isinstance(layer, bool) or not isinstance(layer, (int, torch.SymInt)):
            if isinstance(layer, torch.Tensor) and layer.numel() == 1:
                layer = int(layer)
            else:
                raise LayerIndexError(f"layer must be an int, got {layer!r}")
        n = self.n_layers
        if not -n <= layer < n:
            raise LayerIndexError(
                f"layer {layer} out of range for a model with {n} layers ({0}..{n - 1})"
            )
        return layer % n

    def resolve_layers(self, layers: Sequence[int] | None) -> tuple[int, ...]:
        """All layers for ``None``, else each index normalised (order kept)."""
        if layers is None:
            return tuple(range(self.n_layers))
        out = tuple(self.resolve_layer(layer) for layer in layers)
        if len(set(out)) != len(out):
            raise ValueError(f"layers {list(layers)} name the same layer twice")
        return out

    def resolve_head(self, head: int, site: str = "z") -> int:
        """Check a head index for ``site`` (key/value sites have ``n_kv_heads`` heads)."""
        kind = check_kind(site)
        n = self.n_kv_heads if kind.kv else self.n_heads
        what = "n_kv_heads" if kind.kv else "n_heads"
        if isinstance(head, bool) or not isinstance(head, int) or not -n <= head < n:
            raise InputError(
                f"head {head} out of range for site {site!r}: the model has n_heads="
                f"{self.n_heads}, n_kv_heads={self.n_kv_heads}, so {site!r} takes heads "
                f"0..{n - 1} ({what})"
            )
        return head % n

    def prepare(self, inputs: Inputs, attention_mask: torch.Tensor | None = None) -> Batch:
        """Tokenise and check ``inputs`` (strings, ids, or a ``BatchEncoding``)."""
        return prepare_batch(
            inputs,
            tokenizer=self.tokenizer,
            device=self.device,
            vocab_size=self.vocab_limit,
            max_positions=self.max_positions,
            attention_mask=attention_mask,
        )

    def tokenize(self, text: str) -> torch.Tensor:
        """The token ids ``[T]`` of one string, exactly as the captures tokenise it.

        Example::

            ids = adapter.tokenize("The Eiffel Tower")   # with the tokenizer's BOS, if it adds one
            adapter.capture(ids)                         # the same capture as of the string

        Returns:
            ``[T]`` int64 on the model's device.

        Raises:
            InputError: no tokenizer, an empty string, or not one string (several prompts go to
                :meth:`prepare`, which also gives their attention mask).
        """
        if not isinstance(text, str):
            raise InputError(
                f"tokenize takes one string, got {type(text).__name__}; for a batch use "
                "adapter.prepare(texts), which also returns the attention mask"
            )
        return self.prepare(text).input_ids[0]

    def to_single_token(self, answer: str | int) -> int:
        """The id of a one-token answer; several tokens is an error naming them.

        Strings are tokenised without special tokens. Most tokenizers fold a leading space
        into the token, so ``" Paris"`` and ``"Paris"`` differ.
        """
        if isinstance(answer, int):
            if not 0 <= answer < self.vocab_limit:
                raise InputError(
                    f"token id {answer} is outside the vocabulary (0..{self.vocab_limit - 1})"
                )
            return answer
        if self.tokenizer is None:
            raise InputError("a string answer needs a tokenizer; pass a token id instead")
        ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            pieces = self.tokenizer.convert_ids_to_tokens(ids)
            hint = ""
            if not answer.startswith(" "):
                alt = self.tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
                if len(alt) == 1:
                    hint = f"; ' {answer}' (with a leading space) is one token"
            raise InputError(
                f"{answer!r} is {len(ids)} tokens {pieces}, but one token is needed{hint}"
            )
        unk = getattr(self.tokenizer, "unk_token_id", None)
        if unk is not None and ids[0] == unk and answer.strip() != self.tokenizer.unk_token:
            raise InputError(
                f"{answer!r} is not in the tokenizer's vocabulary: it tokenizes to the unknown "
                f"token {self.tokenizer.unk_token!r} (id {unk}); a metric on it would measure "
                "every unknown word at once"
            )
        return int(ids[0])

    # -- TransformerLens-style entry points (oculi.tl) ---------------------------------------
    def to_str_tokens(
        self, inputs: Any, prepend_bos: bool | None = None
    ) -> list[str] | list[list[str]]:
        """Each token as its decoded string (``' Mary'``), a list per row for batches; see
        :func:`oculi.tl.tokens.to_str_tokens`."""
        from oculi.tl.tokens import to_str_tokens

        return to_str_tokens(self, inputs, prepend_bos)

    def to_tokens(
        self,
        input: str | list[str],
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
        move_to_device: bool = True,
    ) -> torch.Tensor:
        """TransformerLens's ``to_tokens``: ids ``[batch, pos]``; see :mod:`oculi.tl.tokens`."""
        from oculi.tl.tokens import to_tokens

        return to_tokens(self, input, prepend_bos, padding_side, move_to_device)

    def to_string(self, tokens: Any) -> str | list[str]:
        """Decode ``[pos]`` ids to a string (``[batch, pos]``: one per row)."""
        from oculi.tl.tokens import to_string

        return to_string(self, tokens)

    @property
    def cfg(self) -> Any:
        """TransformerLens's ``model.cfg``: ``n_layers``, ``n_heads``, ``d_model``, ... ."""
        from oculi.tl.tokens import tl_config

        return tl_config(self)

    def run_with_cache(self, input: Any, names_filter: Any = None, **kwargs: Any) -> Any:
        """``(logits [batch, pos, d_vocab], cache)`` with the cache keyed by TransformerLens
        hook names; see :func:`oculi.tl.run_with_cache`."""
        from oculi.tl.run import run_with_cache

        return run_with_cache(self, input, names_filter, **kwargs)

    def run_with_hooks(
        self, input: Any, fwd_hooks: Any = (), bwd_hooks: Any = (), **kwargs: Any
    ) -> Any:
        """One forward with TransformerLens hook functions ``fwd_hooks=[(name, fn)]``, where
        ``fn(activation, hook)`` may return a replacement; see :func:`oculi.tl.run_with_hooks`."""
        from oculi.tl.run import run_with_hooks

        return run_with_hooks(self, input, fwd_hooks, bwd_hooks, **kwargs)

    def run_with_saes(self, input: Any, saes: Any, **kwargs: Any) -> Any:
        """SAELens' ``run_with_saes``: one forward with each SAE spliced at its hook (without
        its error term unless ``use_error_term=True``); see :func:`oculi.tl.run_with_saes`."""
        from oculi.tl.saes import run_with_saes

        return run_with_saes(self, input, saes, **kwargs)

    def run_with_cache_with_saes(self, input: Any, saes: Any, **kwargs: Any) -> Any:
        """SAELens' ``run_with_cache_with_saes``: ``(logits, cache)`` with the SAEs spliced and
        their latents cached as ``<hook>.hook_sae_acts_post``; see
        :func:`oculi.tl.run_with_cache_with_saes`."""
        from oculi.tl.saes import run_with_cache_with_saes

        return run_with_cache_with_saes(self, input, saes, **kwargs)

    def hooks(self, fwd_hooks: Any = (), bwd_hooks: Any = (), **kwargs: Any) -> Any:
        """``with adapter.hooks(fwd_hooks=[(name, fn)]):`` every forward inside runs them
        (generation included); see :func:`oculi.tl.run.hooks`."""
        from oculi.tl.run import hooks

        return hooks(self, fwd_hooks, bwd_hooks, **kwargs)

    def __call__(self, input: Any, return_type: Any = "logits", **kwargs: Any) -> Any:
        """``model(tokens)`` as in TransformerLens: logits ``[batch, pos, d_vocab]``."""
        return self.run_with_hooks(input, return_type=return_type, **kwargs)

    # -- running -------------------------------------------------------------------------
    def forward(
        self, inputs: Inputs, *, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The model's logits ``[T, V]`` (``[B, T, V]`` for batches), padding handled."""
        batch = self.prepare(inputs, attention_mask)
        with no_grad():
            logits = self.model(**batch.model_kwargs(), use_cache=False).logits
        return logits[0] if batch.single else logits

    def generate(
        self,
        prompt: Inputs,
        max_new_tokens: int = 20,
        *,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> str | list[str]:
        """Greedy (or ``**kwargs``-configured) generation; returns the decoded continuation(s).

        A batch is generated left-padded, whatever side it was padded on (strings are padded on
        the tokenizer's ``padding_side``; ids come with their mask): each row continues token
        for token as its prompt alone would (:mod:`oculi.models.generation`). Interventions
        open around the call count negative positions from each prompt's end (``-1`` is
        every prompt's last token) and non-negative ones in the batch as given (refused where
        re-padding moved the patched rows differently). :meth:`generate_ids` returns the ids
        instead of text.

        Raises:
            InputError: no tokenizer (the continuation is decoded), or a prompt plus
                ``max_new_tokens`` longer than the model's context.
        """
        if self.tokenizer is None:
            raise InputError(
                "generate decodes its output and needs a tokenizer; attach one "
                "(oculi.attach(model, tokenizer)), or call adapter.generate_ids with token ids"
            )
        new = self.generate_ids(prompt, max_new_tokens, attention_mask=attention_mask, **kwargs)
        texts = self.tokenizer.batch_decode(
            new.reshape(-1, new.shape[-1]), skip_special_tokens=True
        )
        return texts[0] if new.dim() == 1 else texts

    def generate_ids(
        self,
        prompt: Inputs,
        max_new_tokens: int = 20,
        *,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """The generated token ids ``[n]`` (``[B, n]`` for batches), padding handled as in
        :meth:`generate` (see :func:`oculi.models.generation.generate_ids`)."""
        return generate_ids(self, prompt, max_new_tokens, attention_mask=attention_mask, **kwargs)

    # -- captures ------------------------------------------------------------------------
    def capture(
        self,
        inputs: Inputs,
        config: CaptureConfig | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        stream_to: str | os.PathLike | None = None,
    ) -> AttentionCapture:
        """Attention internals (q/k/v, patterns, per-head outputs) in one forward pass."""
        return self.capture_full(
            inputs,
            attention=config or CaptureConfig(),
            residual=None,
            mlp=None,
            logits=None,
            attention_mask=attention_mask,
            stream_to=stream_to,
        ).attention  # type: ignore[return-value]

    def capture_residual(
        self,
        inputs: Inputs,
        config: ResidualConfig | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        stream_to: str | os.PathLike | None = None,
    ) -> ResidualCapture:
        """The residual stream at the four points of each layer."""
        return self.capture_full(
            inputs,
            attention=None,
            residual=config or ResidualConfig(),
            mlp=None,
            logits=None,
            attention_mask=attention_mask,
            stream_to=stream_to,
        ).residual  # type: ignore[return-value]

    def capture_mlp(
        self,
        inputs: Inputs,
        config: MLPConfig | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        stream_to: str | os.PathLike | None = None,
    ) -> MLPCapture:
        """MLP internals: gate, up, post-activation and output."""
        return self.capture_full(
            inputs,
            attention=None,
            residual=None,
            mlp=config or MLPConfig(),
            logits=None,
            attention_mask=attention_mask,
            stream_to=stream_to,
        ).mlp  # type: ignore[return-value]

    def capture_logits(
        self,
        inputs: Inputs,
        config: LogitConfig | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        stream_to: str | os.PathLike | None = None,
    ) -> LogitCapture:
        """Lazy layer-wise logits (logit lens) from the normalised residual."""
        return self.capture_full(
            inputs,
            attention=None,
            residual=None,
            mlp=None,
            logits=config or LogitConfig(),
            attention_mask=attention_mask,
            stream_to=stream_to,
        ).logits

    def capture_full(
        self,
        inputs: Inputs,
        attention: CaptureConfig | None = CaptureConfig(),  # noqa: B008 - frozen dataclass
        residual: ResidualConfig | None = ResidualConfig(),  # noqa: B008
        mlp: MLPConfig | None = MLPConfig(),  # noqa: B008
        logits: LogitConfig | None = LogitConfig(),  # noqa: B008
        *,
        attention_mask: torch.Tensor | None = None,
        stream_to: str | os.PathLike | None = None,
        overwrite: bool = True,
        saes: Any = None,
        sparse_latents: bool = False,
    ) -> FullCapture:
        """Everything asked for, from one forward pass. Pass ``None`` to skip a part.

        ``saes`` (an :class:`oculi.sae.SAE` or a list) adds each SAE's latent activations,
        encoded from the site it reads in the same forward: ``full.latents[i]`` is
        ``[B, T, d_sae]`` (``[T, d_sae]`` for one prompt; sparse COO with
        ``sparse_latents=True``; zero at padding), also under SAELens' hook names
        (``full["blocks.6.hook_resid_post.hook_sae_acts_post"]``). The SAE reads the site as
        recorded: in a config's ``storage_dtype`` where a part records the same site. ::

            full = adapter.capture_full(prompts, attention=None, saes=[sae6, sae12])
            full.latents[0].shape            # [B, T, d_sae] of sae6

        The memory plan (:mod:`oculi.capture.memory`) runs the batch in micro-batches, or
        attention a block of query positions at a time, where the whole does not fit; it
        refuses, before any forward, what does not fit at all. ``stream_to`` (a folder path,
        which oculi creates and owns) writes the capture there one layer at a time as the
        forward runs and returns it memory-mapped from the files (long contexts:
        :mod:`oculi.capture.stream`); an oculi capture folder already there is replaced
        unless ``overwrite=False``. The ``capture*`` methods take ``stream_to`` too. A
        streamed capture's tensors live in the folder's files (``storage_device`` does not
        apply; ``storage_dtype`` does).
        """
        batch = self.prepare(inputs, attention_mask)
        requests, storage = {}, {}
        plan = build_full_capture(self, attention, residual, mlp, logits)
        bound = None
        if saes is not None:
            from oculi.sae.latents import bind_saes

            bound = bind_saes(self, saes, "capture_full(saes=...)")
            if stream_to is not None:
                raise InputError(
                    "capture_full: saes= does not stream (latents of a long context are "
                    "[T, d_sae] per SAE); harvest them with oculi.harvest(..., saes=...)"
                )
            for layer, site, _ in bound[1]:
                plan.want(site, (layer,), None, None)
        for kind, (layers, dtype, device) in plan.requests.items():
            requests[kind] = layers
            storage[kind] = (dtype, device)
        if stream_to is not None:
            from oculi.capture.stream import stream_capture

            return stream_capture(
                self,
                batch,
                lambda recorded: plan.assemble(self, batch, recorded),
                requests,
                storage,
                stream_to,
                overwrite=overwrite,
            )
        recorded = record_planned(self, batch, requests, storage=storage)
        full = plan.assemble(self, batch, recorded)
        if bound is not None:
            from oculi.sae.latents import encode_recorded

            latents = encode_recorded(*bound, recorded, batch.attention_mask, sparse=sparse_latents)
            full.latents = [a[0] if batch.single else a for a in latents]
            full.metadata["saes"] = [
                {"site": site, "layer": layer, "d_sae": sae.d_sae, "kind": sae.kind}
                for sae, (layer, site, _) in zip(*bound)
            ]
        return full

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({type(self.model).__name__}, family={self.anatomy.family!r}, "
            f"n_layers={self.n_layers}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, "
            f"d_model={self.d_model}, d_head={self.d_head}, d_mlp={self.d_mlp}, "
            f"d_vocab={self.d_vocab})"
        )


def attach(model: nn.Module, tokenizer: Any = None) -> Adapter:
    """Wrap an already-loaded causal LM; the family is read from ``model.config``.

    Example::

        model = AutoModelForCausalLM.from_pretrained(path)
        adapter = oculi.attach(model, AutoTokenizer.from_pretrained(path))
    """
    return Adapter(model, tokenizer)
