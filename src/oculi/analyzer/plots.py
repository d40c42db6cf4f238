"""``ModelAnalyzer``'s figures from a prompt: the logit lens's convergence, input preservation
and prediction refinement, and token residuals across layers (seed 002's ``plot_*`` calls).

::

    fig = analyzer.plot_convergence("The quick brown fox", save_path="convergence.png")
    analyzer.plot_layer_embeddings("The cat sat on the mat", layer_indices=[0, 6, 11])

Each runs one forward pass, draws with :mod:`oculi.visualize` (the ``[viz]`` extra) and
returns the matplotlib ``Figure``, also written to ``save_path`` when given. The arrays drawn
are the numbers of :meth:`get_convergence_metrics`, :meth:`input_preservation` and
:meth:`project_embeddings`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from oculi.analyzer.lens import LensAnalyses
from oculi.visualize._common import save_figure


def _finish(fig: Any, save_path: str | os.PathLike | None) -> Any:
    if save_path is not None:
        save_figure(fig, save_path, dpi=150, bbox_inches="tight")
    return fig


class LensPlots(LensAnalyses):
    """Mixed into :class:`~oculi.analyzer.ModelAnalyzer`."""

    def _tokens(self, lc: Any) -> list[str]:
        return self.tokenizer.convert_ids_to_tokens(lc.metadata["input_ids"][0])

    def plot_convergence(self, text: str, save_path: str | os.PathLike | None = None) -> Any:
        """Four ``[layer, position]`` panels (:func:`oculi.visualize.convergence`): KL from the
        final distribution, top-1 agreement with the final top-1, the final top-1's rank, and
        the layer's top-1 logit (:meth:`get_convergence_metrics`)."""
        from oculi.visualize.lens import convergence

        lc = self._lens(text, top_k=1)
        return _finish(convergence(lc, tokens=self._tokens(lc)), save_path)

    def plot_input_preservation(self, text: str, save_path: str | os.PathLike | None = None) -> Any:
        """The input token's rank at its own position per layer, its mean probability per
        layer, and the KL of each layer from the input embeddings' lens
        (:func:`oculi.visualize.input_preservation` with :meth:`input_preservation`'s
        ``kl_from_input``)."""
        from oculi.visualize.lens import input_preservation

        lc, numbers = self._preservation(text)
        fig = input_preservation(
            lc, tokens=numbers["tokens"], kl_from_input=numbers["kl_from_input"], metrics=numbers
        )
        return _finish(fig, save_path)

    def plot_prediction_refinement(
        self,
        text: str,
        layers: Sequence[int] | None = None,
        *,
        top_k: int = 3,
        position: int = -1,
        save_path: str | os.PathLike | None = None,
    ) -> Any:
        """The probability of the model's top-``k`` next tokens at ``position`` at each of
        ``layers`` (default all; the last layer is always added), one line per token
        (:func:`oculi.visualize.prediction_refinement`)."""
        from oculi.visualize.lens import prediction_refinement

        lc = self._lens(text, top_k, self._lens_layers(layers))
        ax = prediction_refinement(lc, self.tokenizer, position=position, top_k=top_k)
        return _finish(ax.figure, save_path)

    def plot_layer_embeddings(
        self,
        text: str,
        layer_indices: Sequence[int] | None = None,
        method: str = "pca",
        *,
        seed: int = 0,
        save_path: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> Any:
        """The tokens' residuals leaving each of ``layer_indices`` (default: five layers from
        first to last), projected together to 2-D (:func:`oculi.analyzer.project`, ``method``
        ``"pca"``, ``"tsne"`` or ``"umap"``; ``**kwargs`` go to the reducer) and drawn by
        :func:`oculi.visualize.layer_embeddings`: one colour per layer, a line per token."""
        from oculi.analyzer.projection import project
        from oculi.capture import ResidualConfig
        from oculi.visualize.embeddings import layer_embeddings

        n = self.adapter.n_layers
        if layer_indices is None:
            layer_indices = sorted({0, n // 4, n // 2, 3 * n // 4, n - 1})
        chosen = self._lens_layers(layer_indices, keep_last=False)
        post = ResidualConfig(
            chosen, capture_pre_attn=False, capture_post_attn=False, capture_pre_mlp=False
        )
        resid = self.adapter.capture_residual(text, post).post_mlp  # [L', T, d]
        tokens = self.tokenizer.convert_ids_to_tokens(self.adapter.prepare(text).input_ids[0])
        labels = [f"{layer}:{tok}" for layer in chosen for tok in tokens]
        flat = resid.reshape(-1, resid.shape[-1]).float().cpu().numpy()
        proj = project(flat, labels, method, 2, seed=seed, **kwargs)
        coords = proj.coords.reshape(len(chosen), len(tokens), 2)
        name = "PCA" if method == "pca" else method
        ax = layer_embeddings(
            coords, tokens, chosen, title=f"token residuals across layers ({name})"
        )
        return _finish(ax.figure, save_path)
