"""The report page: its numbers against the model's own outputs, its size, and what a
browser shows (headless Chromium, network off)."""

from __future__ import annotations

import os
import re

import pytest
import torch

import oculi
from models import tiny_model, tiny_tokenizer
from oculi.errors import InputError
from oculi.patching import causal_tracing
from oculi.visualize.browser import chromium_path, offline_page
from oculi.visualize.report import build_report, default_subject, render, write_report

PROMPT = "the eiffel tower is in the city of"


@pytest.fixture(scope="module")
def tiny():
    return oculi.attach(tiny_model("gemma3"), tiny_tokenizer())


@pytest.fixture(scope="module")
def page_file(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("report") / "report.html"
    return write_report(tiny, PROMPT, path, samples=2)


def _cells(html: str, section: str) -> list[float]:
    part = html.split(f'<section id="{section}">')[1].split("</section>")[0]
    return [float(v) for v in re.findall(r'<td[^>]* data-v="([^"]+)"', part)]


def test_report_names_the_models_prediction_and_its_probabilities(tiny, page_file):
    html = page_file.read_text(encoding="utf-8")
    probs = torch.softmax(tiny.forward(PROMPT)[-1].float(), dim=-1)  # the model's own output
    top_p, top_i = probs.topk(10)
    predicted = tiny.tokenizer.decode([int(top_i[0])])
    assert re.search(rf'class="oc-pred oc-tok">{re.escape(predicted)}</span>', html)
    shown = _cells(html, "top")
    torch.testing.assert_close(
        torch.tensor(shown, dtype=torch.float64), top_p.double(), atol=1e-6, rtol=0
    )


def test_report_carries_the_causal_tracing_grid_values(tiny, page_file):
    html = page_file.read_text(encoding="utf-8")
    subject = default_subject(tiny, PROMPT)
    assert subject == "the eiffel tower is in the city"  # every token but the last
    top1 = int(tiny.forward(PROMPT)[-1].argmax())
    ref = causal_tracing(tiny, PROMPT, subject, top1, samples=2, progress=False)  # seeded
    assert _cells(html, "tracing") == ref.values.flatten().double().tolist()


def test_report_attribution_adds_up_to_the_models_logit(tiny, page_file):
    html = page_file.read_text(encoding="utf-8")
    part = html.split('<section id="dla">')[1].split("</section>")[0]
    embedding, bias, layers, logit = (
        float(v) for v in re.findall(r'class="oc-sum" data-v="([^"]+)"', part)
    )
    own = tiny.forward(PROMPT)[-1].float()  # the model's own logits
    assert logit == pytest.approx(float(own.max()), abs=1e-4)
    assert embedding + bias + layers == pytest.approx(logit, abs=1e-4)
    grid = [float(v) for v in re.findall(r'<td data-v="([^"]+)"[^>]*>', part)]
    n = tiny.n_layers
    per_layer = torch.tensor(grid[: 2 * n]).reshape(n, 2)  # attention, MLP
    assert float(per_layer.sum()) == pytest.approx(layers, abs=1e-4)
    heads = re.findall(r'data-head="(\d+)\.(\d+)"', part)
    assert len(heads) == n * tiny.n_heads


def test_report_is_self_contained_and_small():
    adapter = oculi.attach(tiny_model("llama_mha"), tiny_tokenizer())
    prompt = " ".join(["the cat sat on the mat and"] * 3)  # 22 tokens with <bos>
    html = render(build_report(adapter, prompt, samples=1))
    assert len(html.encode()) <= 5 * 2**20
    assert not re.search(r'(src|href)="(https?:)?//', html)  # nothing fetched from outside
    assert "<script>" in html and "<style>" in html


def test_report_rejects_bad_inputs(tiny, tmp_path):
    with pytest.raises(InputError, match="non-empty string"):
        write_report(tiny, "  ", tmp_path / "r.html")
    with pytest.raises(InputError, match="subject 'louvre' does not occur"):
        write_report(tiny, PROMPT, tmp_path / "r.html", subject="louvre")
    assert not (tmp_path / "r.html").exists()


def test_report_in_headless_chromium(tiny, page_file, tmp_path):
    _need_browser()
    predicted = tiny.tokenizer.decode([int(tiny.forward(PROMPT)[-1].argmax())])
    with offline_page() as page:
        page.goto(page_file.resolve().as_uri())
        assert predicted in page.inner_text("h1")
        assert page.is_visible(".oc-pred")
        # hovering a token recolours the others by the attention it gives them
        spans = page.locator("#attention .oc-tokens .oc-tok")
        before = spans.evaluate_all("s => s.map(e => e.style.backgroundColor)")
        caption = page.inner_text("#attention .oc-caption")
        spans.nth(3).hover()
        after = spans.evaluate_all("s => s.map(e => e.style.backgroundColor)")
        assert after != before
        assert "position 3" in page.inner_text("#attention .oc-caption") != caption
        # hovering a logit-lens cell shows that cell's top tokens
        page.locator('#lens td[data-l="0"][data-t="2"]').hover()
        assert "layer 0, position 2" in page.inner_text("#lens .oc-detail")
        # the head picker switches the pattern shown
        page.select_option("#attention select", index=1)
        assert "oc-on" not in (
            page.locator("#attention .oc-heads button").first.get_attribute("class") or ""
        )
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        assert page.oculi_errors == []
        assert page.oculi_requests == []


def _need_browser():
    if chromium_path() is None:
        if os.environ.get("OCULI_REQUIRE_BROWSER"):
            pytest.fail("OCULI_REQUIRE_BROWSER is set but no Chromium executable was found")
        pytest.skip("no Chromium executable (apt-get install chromium, or set $OCULI_CHROMIUM)")


def test_notebook_attention_view_works_on_its_own(tiny):
    _need_browser()
    html = tiny.capture(PROMPT)._repr_html_()  # what Jupyter shows for an AttentionCapture
    with offline_page() as page:
        page.set_content(f"<html><body>{html}</body></html>")
        spans = page.locator(".oc-tokens .oc-tok")
        assert spans.count() == len(tiny.to_str_tokens(PROMPT))
        before = spans.evaluate_all("s => s.map(e => e.style.backgroundColor)")
        spans.nth(2).hover()
        assert spans.evaluate_all("s => s.map(e => e.style.backgroundColor)") != before
        assert page.oculi_errors == [] and page.oculi_requests == []


@pytest.mark.gemma
def test_gemma_report_on_a_20_token_prompt(gemma, tmp_path):
    prompt = (
        "In 1889 the engineers finished building the Eiffel Tower, which is located in the city of"
    )
    assert len(gemma.to_str_tokens(prompt)) >= 20
    path = write_report(gemma, prompt, tmp_path / "r.html", subject="the Eiffel Tower", samples=1)
    html = path.read_text(encoding="utf-8")
    assert path.stat().st_size <= 5 * 2**20
    top = int(gemma.forward(prompt)[-1].argmax())
    assert gemma.tokenizer.decode([top]) == " Paris"
    assert 'class="oc-pred oc-tok"> Paris</span>' in html
