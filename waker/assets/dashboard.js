// The operator dashboard, improved when JavaScript runs. Without it the page is forms
// and reloads; with it:
//  * the tables refresh themselves: /dashboard/live is fetched every few seconds and
//    only the rows that changed are swapped, so focus and reading position stay put;
//  * action buttons post in place (Accept: application/json) and say what happened in
//    the status region, which screen readers announce.
(function () {
  "use strict";
  var EVERY_MS = 2000;
  var live = document.getElementById("live");
  var flash = document.getElementById("flash");
  if (!live || !flash || !window.fetch || !window.URLSearchParams || !window.FormData) return;
  var note = document.getElementById("live-note");
  if (note) note.hidden = false;

  function say(text, ok) {
    var p = document.createElement("p");
    p.className = "flash " + (ok ? "ok" : "error");
    p.textContent = text;
    flash.replaceChildren(p);
  }

  function rowIds(root) {
    return Array.prototype.map.call(root.querySelectorAll("tr[id]"), function (r) { return r.id; }).join(" ");
  }

  // Swaps in what changed; the markup is the server's own, escaped when rendered.
  function apply(html) {
    var next = document.createElement("div");
    next.innerHTML = html;
    var focused = document.activeElement && live.contains(document.activeElement) ? document.activeElement.id : "";
    if (rowIds(next) === rowIds(live)) {
      var fresh = next.querySelectorAll("tr[id]");
      var old = live.querySelectorAll("tr[id]");
      for (var i = 0; i < fresh.length; i++) {
        if (old[i].innerHTML !== fresh[i].innerHTML) old[i].replaceWith(fresh[i]);
      }
      var notes = next.querySelectorAll("p");
      var oldNotes = live.querySelectorAll("p");
      for (var j = 0; j < notes.length && j < oldNotes.length; j++) {
        if (oldNotes[j].textContent !== notes[j].textContent) oldNotes[j].textContent = notes[j].textContent;
      }
    } else {
      live.replaceChildren.apply(live, Array.prototype.slice.call(next.childNodes));
    }
    if (focused && document.activeElement !== document.getElementById(focused)) {
      var again = document.getElementById(focused);
      // the button acted on may be gone (erase leaves no erase button): the message
      // about it is the next thing to read
      (again || flash).focus();
    }
  }

  var last = null;
  function refresh() {
    return fetch("/dashboard/live", { credentials: "same-origin", cache: "no-store", headers: { accept: "text/html" } })
      .then(function (r) {
        if (r.status === 401) { location.reload(); return null; }
        if (!r.ok) throw new Error("status " + r.status);
        return r.text();
      })
      .then(function (html) {
        if (html !== null && html !== last) { last = html; apply(html); }
      });
  }

  function loop() {
    (document.hidden ? Promise.resolve() : refresh())
      .catch(function () { /* the next round tries again */ })
      .then(function () { setTimeout(loop, EVERY_MS); });
  }
  setTimeout(loop, EVERY_MS);

  document.addEventListener("submit", function (e) {
    var form = e.target;
    if (!(form instanceof HTMLFormElement) || !form.hasAttribute("data-inline")) return;
    e.preventDefault();
    if (form.dataset.busy) return;
    form.dataset.busy = "1";
    fetch(form.action, {
      method: "POST",
      body: new URLSearchParams(new FormData(form)),
      credentials: "same-origin",
      headers: { accept: "application/json" }
    })
      .then(function (r) {
        if (r.status === 401) { location.reload(); return null; }
        return r.json();
      })
      .then(function (answer) {
        if (!answer) return null;
        say(answer.message, answer.ok);
        return refresh();
      })
      .catch(function () { say("The waker did not answer, so the action may not have happened. Try again.", false); })
      .then(function () { delete form.dataset.busy; });
  });
})();
