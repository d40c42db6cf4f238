// oculi's interactive views (logit-lens hover, attention head picker). No dependencies, no
// network: the data of each view sits in a <script type="application/json"> inside its root.
(function () {
  "use strict";
  function pct(p) { return (100 * p).toFixed(p < 0.001 ? 3 : 1) + "%"; }
  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }
  function data(root) { return JSON.parse(root.querySelector("script.oc-data").textContent); }
  function blue(w) { return "rgba(37, 99, 235, " + Math.max(0, Math.min(1, w)).toFixed(3) + ")"; }

  function barRow(table, token, p) {
    var tr = el("tr"), bar = el("span", "oc-bar");
    bar.style.width = Math.max(1, Math.round(120 * p)) + "px";
    tr.appendChild(el("td")).appendChild(el("span", "oc-tok", token));
    tr.appendChild(el("td")).appendChild(bar);
    tr.appendChild(el("td", null, pct(p)));
    table.appendChild(tr);
  }

  function initLens(root) {
    var d = data(root), detail = root.querySelector(".oc-detail");
    function show(cell) {
      var l = +cell.dataset.l, t = +cell.dataset.t, table = el("table", "oc-list");
      root.querySelectorAll("td.oc-active").forEach(function (c) { c.classList.remove("oc-active"); });
      cell.classList.add("oc-active");
      detail.textContent = "";
      detail.appendChild(el("div", "oc-detail-head",
        "layer " + d.layers[l] + ", position " + t + " (" + JSON.stringify(d.tokens[t]) + ")"));
      detail.appendChild(el("div", "oc-meta", "next-token prediction read at this layer"));
      d.top[l][t].forEach(function (r) { barRow(table, r[0], r[1]); });
      detail.appendChild(table);
    }
    root.querySelectorAll("td[data-l]").forEach(function (cell) {
      cell.addEventListener("mouseenter", function () { show(cell); });
    });
    var last = root.querySelector("td[data-last]");
    if (last) show(last);
  }

  function initAttention(root) {
    var d = data(root), select = root.querySelector("select"), strip = root.querySelector(".oc-tokens");
    var matrix = root.querySelector(".oc-matrix"), caption = root.querySelector(".oc-caption");
    var buttons = root.querySelectorAll(".oc-heads button"), spans = [];
    var current = d.initial, query = d.tokens.length - 1;
    function weight(i, j) { var row = d.heads[current].pattern[i]; return j < row.length ? row[j] : 0; }
    function drawMatrix() {
      var table = el("table", "oc-grid"), head = el("tr");
      head.appendChild(el("th", null, "query \\ key"));
      d.tokens.forEach(function (tok) { head.appendChild(el("th", null, tok)); });
      table.appendChild(head);
      d.tokens.forEach(function (tok, i) {
        var tr = el("tr");
        tr.appendChild(el("th", null, tok));
        d.tokens.forEach(function (_, j) {
          var w = weight(i, j), td = el("td");
          td.style.backgroundColor = blue(w);
          td.title = JSON.stringify(tok) + " \u2192 " + JSON.stringify(d.tokens[j]) + ": " + pct(w);
          td.addEventListener("mouseenter", function () { query = i; paintTokens(); });
          tr.appendChild(td);
        });
        table.appendChild(tr);
      });
      matrix.textContent = "";
      matrix.appendChild(table);
    }
    function paintTokens() {
      var best = 0;
      spans.forEach(function (s, j) {
        var w = weight(query, j);
        if (w > weight(query, best)) best = j;
        s.style.backgroundColor = blue(w);
        s.title = pct(w);
        s.classList.toggle("oc-query", j === query);
      });
      caption.textContent = d.heads[current].label + ": from " + JSON.stringify(d.tokens[query]) +
        " (position " + query + ") most attention goes to " + JSON.stringify(d.tokens[best]) +
        " (position " + best + ", " + pct(weight(query, best)) + ")";
    }
    function choose(k) {
      current = k;
      select.value = String(k);
      buttons.forEach(function (b) { b.classList.toggle("oc-on", +b.dataset.head === k); });
      drawMatrix();
      paintTokens();
    }
    d.tokens.forEach(function (tok, i) {
      var s = el("span", "oc-tok", tok);
      s.addEventListener("mouseenter", function () { query = i; paintTokens(); });
      strip.appendChild(s);
      spans.push(s);
    });
    d.heads.forEach(function (h, k) {
      var o = el("option", null, h.label);
      o.value = String(k);
      select.appendChild(o);
    });
    select.addEventListener("change", function () { choose(+select.value); });
    buttons.forEach(function (b) { b.addEventListener("click", function () { choose(+b.dataset.head); }); });
    root.oculiChoose = function (key) {
      for (var k = 0; k < d.heads.length; k++) {
        if (d.heads[k].key === key) { choose(k); return true; }
      }
      return false;
    };
    choose(current);
  }

  function init() {
    document.querySelectorAll("[data-oculi]").forEach(function (root) {
      if (root.dataset.ocReady) return;
      root.dataset.ocReady = "1";
      if (root.dataset.oculi === "lens") initLens(root);
      else if (root.dataset.oculi === "attention") initAttention(root);
    });
    // clicking a head in an attribution grid shows its pattern in the attention view
    document.querySelectorAll("td[data-head]").forEach(function (cell) {
      if (cell.dataset.ocReady) return;
      cell.dataset.ocReady = "1";
      cell.addEventListener("click", function () {
        var view = document.querySelector("[data-oculi=attention]");
        if (view && view.oculiChoose && view.oculiChoose(cell.dataset.head)) {
          view.scrollIntoView({ behavior: "smooth", block: "nearest" });
        }
      });
    });
  }
  window.oculiInit = init;
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
