"""Seed 001 chapters 6-8 and seed 000's attribution/composition examples on Gemma 3 270M.

The examples run as documented, adapted where the seed is wrong for this model or this API:
Gemma 3 270M has 18 layers of 4 heads (the seed's layers 20 and heads 5 do not exist), and
weight-based composition needs the weights (the adapter) next to the capture. The references
are the model's own logits and identities the results must satisfy.
"""

from __future__ import annotations

import pytest
import torch

from oculi import CaptureConfig
from oculi.analysis import AttributionMethods, CircuitDetection, CompositionAnalysis

pytestmark = pytest.mark.gemma
FACT = "The Eiffel Tower is in the city of"


@pytest.fixture(scope="module")
def repeated(gemma):
    gen = torch.Generator().manual_seed(0)
    half = torch.randint(1000, 20_000, (1, 20), generator=gen)
    bos = torch.tensor([[gemma.tokenizer.bos_token_id]])
    return gemma.capture(torch.cat([bos, half, half], dim=1))


def test_seed_ch6_circuit_detection(gemma, repeated):
    capture = repeated
    induction = CircuitDetection.detect_induction_heads(capture, threshold=0.3)
    mask = induction > 0.3
    found = [(layer, head) for layer, head in mask.nonzero().tolist()]
    assert found and all(layer >= 3 for layer, _ in found)  # induction needs earlier layers
    prev_token = CircuitDetection.detect_previous_token_heads(capture, threshold=0.5)
    assert (prev_token > 0.5).sum().item() >= 1
    for layer in [0, 10, 17]:  # the seed's layer 20 does not exist in an 18-layer model
        for head in range(4):
            result = CircuitDetection.classify_attention_head(capture, layer, head)
            assert result["pattern"] in (
                "induction",
                "duplicate_token",
                "previous_token",
                "bos",
                "recent",
                "unknown",
            )
    every = CircuitDetection.classify_heads(capture, thresholds={"induction": 0.3})
    labelled = {
        (i, h)
        for i, row in enumerate(every["labels"])
        for h, x in enumerate(row)
        if x == "induction"
    }
    assert labelled == set(found)


def whole_graph_flow(attention) -> torch.Tensor:
    """One SciPy max flow per token on the whole graph, capacities ``round(Â·2^30)``: the
    reference the pruned-and-proven path must reproduce bit for bit."""
    from scipy.sparse import csr_array
    from scipy.sparse.csgraph import maximum_flow

    mixed = 0.5 * attention.patterns.double().mean(1) + 0.5 * torch.eye(
        attention.patterns.shape[-1]
    )
    n_layers, n = mixed.shape[0], mixed.shape[-1]
    layer, rows, cols = (mixed > 0).nonzero(as_tuple=True)
    caps = (mixed[layer, rows, cols] * 2**30).round().to(torch.int32).numpy()
    size = (n_layers + 1) * n
    graph = csr_array(
        (caps, ((layer * n + cols).numpy(), ((layer + 1) * n + rows).numpy())), (size, size)
    )
    sink = n_layers * n + n - 1
    values = [maximum_flow(graph, j, sink, method="dinic").flow_value / 2**30 for j in range(n)]
    return torch.tensor(values, dtype=torch.float64)


def test_seed_ch7_attribution(gemma):
    full = gemma.capture_full(FACT, attention=CaptureConfig(capture_head_contributions=True))
    target_id = gemma.tokenizer.encode(" Paris", add_special_tokens=False)[0]
    unembed = gemma.model.lm_head.weight
    # the seed's form: exact through the final norm the residual capture recorded
    seed = AttributionMethods.direct_logit_attribution(
        full.residual, unembed, target_id, position=-1
    )
    assert seed.values.shape == (18,) and seed.note == ""
    # with the final norm given, or on the FullCapture, it is the model's logit too
    exact = AttributionMethods.direct_logit_attribution(
        full.residual, unembed, target_id, position=-1, final_norm=gemma.model.model.norm
    )
    logit = float(gemma.forward(FACT)[-1, target_id])
    assert abs(float(exact.total) - logit) <= 1e-4 * abs(logit)
    dla = AttributionMethods.direct_logit_attribution(full, target_id, position=-1)
    torch.testing.assert_close(dla.values, exact.values)
    torch.testing.assert_close(seed.values, exact.values)
    comp = AttributionMethods.component_attribution(full.residual, full.mlp, unembed, target_id)
    assert comp.values.shape == (18, 2)
    heads = AttributionMethods.head_attribution(full, target_id)
    top = AttributionMethods.top_attributions(heads, k=10)
    assert len(top) == 10 and abs(top[0][1]) >= abs(top[-1][1])
    # neurons, through Gemma's post-feedforward norm frozen: each layer's sum is its MLP share
    neurons = AttributionMethods.neuron_attribution(full, target_id, gemma)
    assert neurons.values.shape == (18, gemma.d_mlp)
    torch.testing.assert_close(
        neurons.values.sum(-1) + neurons.bias, dla.mlp, rtol=1e-4, atol=1e-4 * abs(logit)
    )
    flow = AttributionMethods.attention_flow(full.attention)
    assert flow.values.shape == (full.attention.patterns.shape[-1],)
    torch.testing.assert_close(flow.values, whole_graph_flow(full.attention), rtol=0, atol=0)
    cut = AttributionMethods.attention_flow(full.attention, method="cut")
    assert bool((cut.values >= flow.values - 1e-8).all())
    weighted = AttributionMethods.value_weighted_attention(full.attention, gemma)
    assert weighted.values.shape == full.attention.patterns.shape


def test_flow_on_repeated_tokens_is_the_whole_graph_flow(repeated):
    # 41 tokens, where induction heads attend far back: every token proven or solved
    flow = AttributionMethods.attention_flow(repeated)
    torch.testing.assert_close(flow.values, whole_graph_flow(repeated), rtol=0, atol=0)
    assert sum(flow.metadata["proven"].values()) == 41


def test_seed_ch8_composition(gemma, repeated):
    # the seed passes only the capture; weight composition needs the weights: the adapter
    qk = CompositionAnalysis.qk_composition(gemma, source=(10, 1), target=(16, 3))
    assert 0 < qk.values.mean() < 1
    circuits = CompositionAnalysis.detect_induction_circuit(repeated, gemma, threshold=0.3)
    listed = circuits.metadata["circuits"]
    assert listed
    for c in listed[:5]:
        prev, ind = c["previous_token_head"], c["induction_head"]
        assert prev[0] < ind[0] and 0 <= c["composition_score"] <= 1
        assert c["composition_score"] == pytest.approx(float(circuits.values[(*prev, *ind)]))
    path = [(2, 3), (5, 1), (11, 2)]
    virtual = CompositionAnalysis.virtual_attention(repeated, path)
    assert virtual.metadata["path_str"] == "L2H3 -> L5H1 -> L11H2"
    torch.testing.assert_close(virtual.values.sum(-1), torch.ones(41, dtype=torch.float64))
