"""Linear probes on a harvest store: fit a direction, measure it on held-out prompts, steer it.

::

    store = oculi.open_harvest("acts")
    result = oculi.probe.fit(store, "resid_post", 6, labels)   # one label per row or prompt
    result.accuracy                      # on held-out prompts
    result.direction                     # unit vector [d_model], toward classes[1]
    result.scale                         # the activations' typical norm (~4500 at Gemma's 6)
    with InterventionContext(adapter, [result.steering_vector(coefficient=0.1)]):
        adapter.generate("Today I feel so")   # a sentiment probe: " joy" becomes the top-1

A probe is logistic regression from one ``(site, layer)`` activation to a label. Labels come
per row (one per token) or per prompt; per-prompt labels are read at each prompt's last token
(``position="last"``) or at all its tokens (``"all"``). Held-out rows are the index's
``"test"`` split when the harvest made one, else a seeded fraction of prompts: whole prompts
either way, so no prompt is in both. ``method="sklearn"`` (default) loads the selected rows
and fits scikit-learn's ``LogisticRegression``; ``method="torch"`` streams the store in
shuffled batches through a linear layer, for data sets larger than memory.

A probe's steering vector adds ``coefficient * scale`` along its unit direction, ``scale``
being the median L2 norm of the rows it was fitted on: ``coefficient`` is a fraction of a
typical activation there, so it means the same on every model and layer (0.1-0.3 steers
Gemma 3 270M's middle layers; 1.0 adds a vector as long as the residual itself).
``steering_vector(raw=True)`` adds ``coefficient`` times the unit direction instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from oculi.capture.interrupts import no_grad
from oculi.errors import InputError, require_extra

if TYPE_CHECKING:
    from oculi.harvest.store import HarvestStore
    from oculi.intervention.steering import SteeringVector

__all__ = ["ProbeResult", "fit"]


@dataclass
class ProbeResult:
    """A fitted linear probe.

    Attributes:
        site, layer: where it reads.
        accuracy: accuracy on the held-out rows.
        train_accuracy: accuracy on the rows it was fitted on.
        classes: the label values, in the order of ``weights`` rows.
        weights: ``[n_classes, width]`` (one row for binary labels, toward ``classes[1]``).
        bias: ``[n_classes]`` (one entry for binary labels).
        n_train, n_test: rows fitted and held out.
        method: ``"sklearn"`` or ``"torch"``.
        scale: the median L2 norm of the training rows (the unit of
            :meth:`steering_vector`'s coefficient); ``None`` if unknown.
    """

    site: str
    layer: int
    accuracy: float
    train_accuracy: float
    classes: list[Any]
    weights: torch.Tensor
    bias: torch.Tensor
    n_train: int
    n_test: int
    method: str
    scale: float | None = None
    estimator: Any = field(default=None, repr=False)

    @property
    def direction(self) -> torch.Tensor:
        """Unit vector ``[width]`` along which the probe's logit grows toward ``classes[1]``."""
        if self.weights.shape[0] != 1:
            raise ValueError(
                f"direction is for binary probes; this one has {len(self.classes)} classes: "
                "use direction_for(label)"
            )
        return self.weights[0] / self.weights[0].norm()

    def direction_for(self, label: Any) -> torch.Tensor:
        """Unit vector toward ``label`` (for binary probes, ``classes[0]`` is ``-direction``)."""
        if label not in self.classes:
            raise KeyError(f"label {label!r} is not one of the probe's classes {self.classes}")
        i = self.classes.index(label)
        if self.weights.shape[0] == 1:
            return self.direction if i == 1 else -self.direction
        w = self.weights[i]
        return w / w.norm()

    def steering_vector(
        self,
        coefficient: float = 1.0,
        *,
        label: Any = None,
        raw: bool = False,
        dtype=torch.float32,
        device="cpu",
        **kwargs: Any,
    ) -> SteeringVector:
        """A :class:`~oculi.intervention.SteeringVector` along the unit direction (toward
        ``label``, default ``classes[1]``) at the probe's site and layer.

        Example::

            vec = result.steering_vector(coefficient=0.1)   # adds 0.1 * result.scale * dir

        Its length is ``coefficient * self.scale``: a multiple of the typical norm of the
        activations the probe was fitted on (``vec.scale``). ``raw=True`` adds ``coefficient``
        times the unit direction instead (a length in activation units). ``dtype``/``device``
        must be the model's; ``kwargs`` go to the constructor (``positions``, ``steps``).

        Raises:
            ValueError: the probe has no recorded ``scale`` (built by hand) and ``raw`` is
                false.
        """
        from oculi.intervention.steering import SteeringVector

        if not raw and self.scale is None:
            raise ValueError(
                "this probe records no scale (the typical norm of its training rows), so a "
                "relative coefficient has no unit; set result.scale, or pass raw=True to add "
                "coefficient * the unit direction"
            )
        vec = self.direction if label is None else self.direction_for(label)
        return SteeringVector(vec.to(dtype=dtype, device=device), self.layer, coefficient,
                              site=self.site, scale=None if raw else self.scale,
                              **kwargs)  # fmt: skip


def fit(
    store: HarvestStore,
    site: str,
    layer: int,
    labels: Any,
    *,
    position: Literal["last", "all"] = "last",
    test_fraction: float = 0.2,
    seed: int = 0,
    method: Literal["sklearn", "torch"] = "sklearn",
    C: float = 1.0,
    max_iter: int = 1000,
    epochs: int = 20,
    batch_rows: int = 256,
    lr: float = 1e-2,
) -> ProbeResult:
    """Fit a logistic-regression probe on ``store[site, layer]``.

    Args:
        store: an opened harvest (:func:`oculi.open_harvest`).
        site, layer: the array to read.
        labels: one label per row (``store.n_rows``) or per prompt (any hashable values,
            e.g. bools, ints, strings); ``None`` leaves a row or prompt out.
        position: for per-prompt labels, ``"last"`` token of each prompt or ``"all"`` tokens.
        test_fraction: prompts held out when the index has no ``"test"`` split.
        seed: seed of the held-out choice and of the torch method's shuffling.
        method: ``"sklearn"`` (rows loaded) or ``"torch"`` (streamed, any size).
        C: inverse L2 strength (sklearn; the torch method uses ``1 / (C * n_train)`` weight decay).
        max_iter: sklearn's iteration cap.
        epochs, batch_rows, lr: the torch method's passes, batch size and Adam learning rate.

    Raises:
        InputError: labels of the wrong length, a single class, an empty split, or a bad option.

    Example::

        store = oculi.open_harvest("acts")
        result = oculi.probe.fit(store, "resid_post", 6, labels=is_french)   # one label per prompt
        result.accuracy, result.weights.shape     # held-out accuracy; [1, d_model] (binary)
    """
    array = store[site, layer]
    y_all, rows = _row_labels(store, labels, position)
    classes = _sorted(set(y_all[rows].tolist()))
    if len(classes) < 2:
        raise InputError(
            f"labels hold {len(classes)} class(es) {classes}; a probe needs two or more"
        )
    code = {c: i for i, c in enumerate(classes)}
    y = np.full(store.n_rows, -1, dtype=np.int64)
    y[rows] = [code[v] for v in y_all[rows]]
    train, test = _split(store, rows, test_fraction, seed)
    if method == "sklearn":
        return _fit_sklearn(array, site, layer, y, train, test, classes, C, max_iter, seed)
    if method == "torch":
        return _fit_torch(
            store, site, layer, y, train, test, classes, C, epochs, batch_rows, lr, seed
        )
    raise InputError(f"method must be 'sklearn' or 'torch', got {method!r}")


def _sorted(values: set[Any]) -> list[Any]:
    try:
        return sorted(values)
    except TypeError:  # mixed types: a stable order all the same
        return sorted(values, key=repr)


def _row_labels(store: HarvestStore, labels: Any, position: str) -> tuple[np.ndarray, np.ndarray]:
    """Labels as a per-row object array and the labelled rows."""
    labels = labels.tolist() if isinstance(labels, (np.ndarray, torch.Tensor)) else list(labels)
    values = np.empty(len(labels), dtype=object)
    values[:] = list(labels)
    n_prompts = int(store.manifest["tokens"]["n_prompts"])
    if len(values) == store.n_rows:
        return values, np.flatnonzero([v is not None for v in values])
    if len(values) != n_prompts:
        raise InputError(
            f"labels has {len(values)} entries; give one per row ({store.n_rows}) or per "
            f"prompt ({n_prompts})"
        )
    if position not in ("last", "all"):
        raise InputError(f"position must be 'last' or 'all', got {position!r}")
    pid = store.index.column("prompt_id").to_numpy()
    per_row = values[pid]
    if position == "last":
        last = np.flatnonzero(np.r_[pid[1:] != pid[:-1], True])
        mask = np.zeros(store.n_rows, dtype=bool)
        mask[last] = True
    else:
        mask = np.ones(store.n_rows, dtype=bool)
    mask &= np.array([v is not None for v in per_row])
    return per_row, np.flatnonzero(mask)


def _split(
    store: HarvestStore, rows: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Train and test rows: the index's ``test`` split if any, else held-out prompts."""
    names = store.index.column("split").combine_chunks().dictionary.to_pylist()
    if "test" in names:
        test_mask = np.isin(rows, store.rows_of("test"))
    else:
        if not 0.0 < fraction < 1.0:
            raise InputError(f"test_fraction must be in (0, 1), got {fraction}")
        pid = store.index.column("prompt_id").to_numpy()[rows]
        prompts = np.unique(pid)
        held = np.random.default_rng(seed).permutation(prompts)[
            : max(1, round(fraction * len(prompts)))
        ]
        test_mask = np.isin(pid, held)
    train, test = rows[~test_mask], rows[test_mask]
    if len(train) == 0 or len(test) == 0:
        raise InputError(
            f"the split leaves {len(train)} training and {len(test)} held-out rows; need both"
        )
    return train, test


def _fit_sklearn(array, site, layer, y, train, test, classes, C, max_iter, seed) -> ProbeResult:
    linear_model = require_extra("sklearn.linear_model", "probe")
    x_train, x_test = array.take(train).astype(np.float64), array.take(test).astype(np.float64)
    # scale features for the solver; the weights are mapped back to raw activations below
    scale = x_train.std(axis=0) + 1e-12
    clf = linear_model.LogisticRegression(C=C, max_iter=max_iter, random_state=seed)
    clf.fit(x_train / scale, y[train])
    weights = torch.from_numpy(clf.coef_ / scale).float()
    return ProbeResult(
        site, layer,
        accuracy=float(clf.score(x_test / scale, y[test])),
        train_accuracy=float(clf.score(x_train / scale, y[train])),
        classes=classes, weights=weights, bias=torch.from_numpy(clf.intercept_).float(),
        n_train=len(train), n_test=len(test), method="sklearn",
        scale=float(np.median(np.linalg.norm(x_train, axis=1))), estimator=clf,
    )  # fmt: skip


def _fit_torch(
    store, site, layer, y, train, test, classes, C, epochs, batch_rows, lr, seed
) -> ProbeResult:
    key = (site, layer)
    n_out = 1 if len(classes) == 2 else len(classes)
    # streaming pass 1: feature mean and scale of the training rows
    width = store[key].shape[1]
    total = torch.zeros(width, dtype=torch.float64)
    sq = torch.zeros(width, dtype=torch.float64)
    n = 0
    norms = []  # one float per training row: the median norm is the steering unit
    for batch in store.shuffled(seed, batch_rows, keys=[key], rows=train):
        x = torch.from_numpy(batch[key]).double()
        total, sq, n = total + x.sum(0), sq + (x * x).sum(0), n + len(x)
        norms.append(x.norm(dim=1))
    mean = total / n
    scale = ((sq / n - mean * mean).clamp_min(0).sqrt() + 1e-12).float()
    mean = mean.float()
    gen = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(width, n_out)
    torch.nn.init.normal_(linear.weight, std=1e-3, generator=gen)
    opt = torch.optim.Adam(linear.parameters(), lr=lr, weight_decay=1.0 / (C * len(train)))
    for epoch in range(epochs):
        for batch in store.shuffled(seed, batch_rows, keys=[key], rows=train, epoch=epoch):
            x = (torch.from_numpy(batch[key]).float() - mean) / scale
            target = torch.from_numpy(y[batch.rows])
            logits = linear(x)
            loss = (torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], target.float())
                    if n_out == 1 else torch.nn.functional.cross_entropy(logits, target))  # fmt: skip
            opt.zero_grad()
            loss.backward()
            opt.step()

    def accuracy(rows: np.ndarray) -> float:
        right = 0
        with no_grad():
            for batch in store.shuffled(seed, batch_rows, keys=[key], rows=rows):
                logits = linear((torch.from_numpy(batch[key]).float() - mean) / scale)
                pred = (logits[:, 0] > 0).long() if n_out == 1 else logits.argmax(1)
                right += int((pred.numpy() == y[batch.rows]).sum())
        return right / len(rows)

    with no_grad():
        weights = linear.weight / scale  # back to raw activations: w·(x - m)/s = (w/s)·x + b'
        bias = linear.bias - (weights * mean).sum(1)
    return ProbeResult(
        site, layer, accuracy=accuracy(test), train_accuracy=accuracy(train), classes=classes,
        weights=weights.detach().clone(), bias=bias.detach().clone(), n_train=len(train),
        n_test=len(test), method="torch", scale=float(np.median(torch.cat(norms).numpy())),
    )  # fmt: skip
