// oculi's site opened from disk (file://): browsers refuse to start a Web Worker there, and
// Material's search runs in one. This stands in for `Worker` on file:// pages only: the worker's
// script runs in a hidden same-origin iframe, and messages cross with plain events, so search
// works offline with nothing fetched from the network. mkdocs.yml lists this file under
// extra.polyfills (which also stops Material's offline plugin from adding a CDN shim).
(function () {
  "use strict";
  if (location.protocol !== "file:") return;

  function loadScript(doc, url) {
    return new Promise(function (resolve, reject) {
      var script = doc.createElement("script");
      script.src = url;
      script.onload = function () { resolve(); };
      script.onerror = function () { reject(new Error("could not load " + url)); };
      doc.head.appendChild(script);
    });
  }

  function FileWorker(url) {
    var target = document.createElement("span"); // an EventTarget the page listens on
    var frame = document.createElement("iframe");
    var pending = [];
    var ready = false;
    var self = this;
    this.onmessage = null;
    this.onerror = null;
    this.addEventListener = target.addEventListener.bind(target);
    this.removeEventListener = target.removeEventListener.bind(target);
    this.dispatchEvent = target.dispatchEvent.bind(target);

    frame.hidden = true;
    frame.setAttribute("aria-hidden", "true");
    frame.setAttribute("title", "search worker");
    document.documentElement.appendChild(frame);
    var inner = frame.contentWindow;
    var absolute = new URL(url, location.href).href;

    // the worker's view: postMessage answers the page, importScripts loads in order
    inner.postMessage = function (data) {
      var event = new MessageEvent("message", { data: data });
      if (typeof self.onmessage === "function") self.onmessage(event);
      target.dispatchEvent(event);
    };
    inner.importScripts = function () {
      var urls = Array.prototype.slice.call(arguments);
      return urls.reduce(function (chain, next) {
        return chain.then(function () {
          return loadScript(inner.document, new URL(next, absolute).href);
        });
      }, Promise.resolve());
    };

    this.postMessage = function (data) {
      if (!ready) { pending.push(data); return; }
      inner.dispatchEvent(new inner.MessageEvent("message", { data: data }));
    };
    this.terminate = function () { frame.remove(); };

    loadScript(inner.document, absolute).then(function () {
      ready = true;
      pending.splice(0).forEach(self.postMessage);
    }, function (error) {
      var event = new ErrorEvent("error", { message: String(error) });
      if (typeof self.onerror === "function") self.onerror(event);
      target.dispatchEvent(event);
    });
  }

  window.Worker = FileWorker;
})();
