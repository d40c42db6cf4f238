"""A vocabulary that holds HTML (``<!--``, ``<script>``, ``</script>``, an ``onload``
attribute) cannot break the report page or run anything in it (BAD_INPUTS row 41).

The tokens sit in the prompt, so they are in every section's data: the logit-lens grid and its
JSON, the attention view's JSON, the tracing grid's column labels. Headless Chromium (network
off) must show all five sections, run the page's own script (hover details), and run nothing
from the vocabulary."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import oculi
from models import VOCAB, WORDS, tiny_model
from oculi.visualize.browser import chromium_path, offline_page
from oculi.visualize.html import esc, json_in_html, json_script, script
from oculi.visualize.report import write_report

HOSTILE = [
    "<!--",
    "<script>",
    "</script>",
    "<svg/onload=window.oculiPwned=1>",
    "<script>window.oculiPwned=2</script>",
    "]]>",
    "a&amp;b",
]
PROMPT = "the eiffel <!-- tower <script> is </script> in <svg/onload=window.oculiPwned=1> the "
PROMPT += "<script>window.oculiPwned=2</script> city ]]> a&amp;b of"
SECTIONS = ["top", "lens", "dla", "attention", "tracing"]


def hostile_tokenizer():
    """A word-level tokenizer split on whitespace only, so each hostile string is one token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    words = [w for w in dict.fromkeys(WORDS) if w not in HOSTILE]
    names = specials + HOSTILE + words
    vocab = {tok: i for i, tok in enumerate(names[:VOCAB])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
        unk_token="<unk>", padding_side="left",
    )  # fmt: skip


@pytest.fixture(scope="module")
def page_file(tmp_path_factory):
    adapter = oculi.attach(tiny_model("gemma3"), hostile_tokenizer())
    tokens = adapter.to_str_tokens(PROMPT)
    assert all(h in tokens for h in HOSTILE[:5])  # the hostile strings are whole tokens
    path = tmp_path_factory.mktemp("hostile") / "report.html"
    return write_report(adapter, PROMPT, path, samples=1)


@pytest.mark.parametrize("text", HOSTILE + ["\u2028", "\\u003c", "'\""])
def test_embedded_json_has_no_markup_and_reads_back(text):
    embedded = json_in_html({"tokens": [text], text: 1})
    assert not set("<>&") & set(embedded)
    assert json.loads(embedded) == {"tokens": [text], text: 1}
    inner = json_script([text]).removeprefix('<script type="application/json" class="oc-data">')
    assert inner.count("</script>") == 1 and inner.endswith("</script>")


def test_page_source_holds_no_raw_hostile_token(page_file):
    html = page_file.read_text(encoding="utf-8")
    blobs = re.findall(r'<script type="application/json" class="oc-data">([^<]*)</script>', html)
    assert len(blobs) == 2  # the lens and the attention data, each free of "<"
    for blob in blobs:
        assert "<!--" in json.loads(blob)["tokens"]  # the real strings, read back
    rest = re.sub(r'<script type="application/json" class="oc-data">[^<]*</script>', "", html)
    rest = rest.replace(f"<script>{script()}</script>", "")  # the page's own script
    assert "<script" not in rest and "</script" not in rest
    for text in HOSTILE[:5]:  # elsewhere a hostile token only ever appears escaped
        assert text not in rest
        assert esc(text) in rest
    for section in SECTIONS:
        assert rest.count(f'<section id="{section}">') == 1


def test_hostile_page_renders_every_section_and_runs_nothing(page_file):
    if chromium_path() is None:
        pytest.skip("no Chromium (apt-get install chromium, or set $OCULI_CHROMIUM)")
    with offline_page() as page:
        page.goto(page_file.resolve().as_uri())
        for section in SECTIONS:  # each section is an element of its own, visible
            assert page.locator(f"body > section#{section}").count() == 1
            assert page.is_visible(f"section#{section} h2")
        assert page.evaluate("window.oculiPwned") is None  # no script from the vocabulary ran
        assert page.locator("svg[onload]").count() == 0
        assert page.locator("script").count() == 3  # two JSON blocks and the page's own
        # the hostile tokens are shown as text, exactly
        shown = page.locator("#attention .oc-tokens .oc-tok").all_inner_texts()
        assert [t for t in shown if t in HOSTILE] == [t for t in HOSTILE[:5]] + HOSTILE[5:]
        # the page's script parsed the JSON: hovering a lens cell shows that cell's detail,
        # and the attention caption quotes the hostile token it hovers
        page.locator('#lens td[data-l="0"][data-t="2"]').hover()
        assert "layer 0, position 2" in page.inner_text("#lens .oc-detail")
        page.locator("#attention .oc-tokens .oc-tok").nth(3).hover()  # "<!--"
        assert "<!--" in page.inner_text("#attention .oc-caption")
        assert page.oculi_errors == []
        assert page.oculi_requests == []


def test_json_reaches_html_only_through_json_script():
    """A new page or view that embeds data builds it with json_script / json_in_html, which
    escape "<": no other module writes an application/json script or json.dumps next to one."""
    src = Path(__file__).resolve().parents[1] / "src" / "oculi"
    offenders = []
    for path in sorted(src.rglob("*.py")):
        if path.name == "html.py" and path.parent.name == "visualize":
            continue
        text = path.read_text(encoding="utf-8")
        if 'type="application/json"' in text or ("<script" in text and "json.dumps(" in text):
            offenders.append(str(path.relative_to(src)))
    assert offenders == []
