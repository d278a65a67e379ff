// df-hf browse: keyboard navigation, expert toggles, index progress. Served locally; no other script.
(function () {
  "use strict";
  const page = document.body.dataset.page;
  const typing = (e) => /^(INPUT|SELECT|TEXTAREA)$/.test(e.target.tagName) || e.target.isContentEditable;
  const go = (el) => { if (el && el.href) window.location.href = el.href; };
  const help = document.getElementById("help");

  // While the index is built, poll its progress and reload when it is ready.
  const banner = document.getElementById("index-banner");
  if (banner) {
    const progress = document.getElementById("index-progress");
    const poll = () => fetch(banner.dataset.poll).then((r) => r.json()).then((s) => {
      if (s.ready) { window.location.reload(); return; }
      progress.textContent = s.rows_indexed.toLocaleString() + " / " + s.rows.toLocaleString();
      setTimeout(poll, 1000);
    }).catch(() => setTimeout(poll, 3000));
    setTimeout(poll, 1000);
  }

  // Gallery: a selected card, moved with the arrow keys (grid-aware), opened with Enter.
  const cards = Array.from(document.querySelectorAll("#gallery .card"));
  let selected = -1;
  const select = (i) => {
    if (!cards.length) return;
    i = Math.max(0, Math.min(cards.length - 1, i));
    if (selected >= 0) cards[selected].classList.remove("selected");
    selected = i;
    cards[i].classList.add("selected");
    cards[i].querySelector("a").focus({ preventScroll: true });
    cards[i].scrollIntoView({ block: "nearest" });
  };
  const columns = () => {
    if (cards.length < 2) return 1;
    const top = cards[0].offsetTop;
    const n = cards.findIndex((c) => c.offsetTop !== top);
    return n === -1 ? cards.length : n;
  };
  cards.forEach((card, i) => card.addEventListener("focusin", () => {
    if (selected >= 0) cards[selected].classList.remove("selected");
    selected = i; card.classList.add("selected");
  }));

  // Row view: expert toggles (state kept in the URL as hide=a,b), OCR line <-> box highlighting.
  const svg = document.getElementById("boxes");
  const toggles = Array.from(document.querySelectorAll("[data-expert-toggle]"));
  const applyToggles = () => {
    const hidden = toggles.filter((t) => !t.checked).map((t) => t.dataset.expertToggle);
    document.querySelectorAll("#boxes .box").forEach((g) => g.classList.toggle("off", hidden.includes(g.dataset.expert)));
    document.querySelectorAll("#boxes-table tr[data-expert]").forEach((tr) => tr.classList.toggle("muted", hidden.includes(tr.dataset.expert)));
    const url = new URL(window.location.href);
    if (hidden.length) url.searchParams.set("hide", hidden.join(",")); else url.searchParams.delete("hide");
    history.replaceState(null, "", url);
    document.querySelectorAll("#prev, #next").forEach((a) => {
      const link = new URL(a.href);
      if (hidden.length) link.searchParams.set("hide", hidden.join(",")); else link.searchParams.delete("hide");
      a.href = link.toString();
    });
  };
  const box = document.getElementById("expert-toggles");
  if (box && box.dataset.hidden) {
    const hidden = box.dataset.hidden.split(",");
    toggles.forEach((t) => { if (hidden.includes(t.dataset.expertToggle)) t.checked = false; });
  }
  toggles.forEach((t) => t.addEventListener("change", applyToggles));
  if (toggles.length) applyToggles();
  const hot = (line, on) => {
    document.querySelectorAll(`[data-line="${line}"]`).forEach((el) => el.classList.toggle("hot", on));
  };
  document.querySelectorAll("[data-line]").forEach((el) => {
    el.addEventListener("mouseenter", () => hot(el.dataset.line, true));
    el.addEventListener("mouseleave", () => hot(el.dataset.line, false));
  });

  document.addEventListener("keydown", (e) => {
    if (e.key === "?" && !typing(e)) { help.hidden = !help.hidden; e.preventDefault(); return; }
    if (e.key === "Escape" && !help.hidden) { help.hidden = true; return; }
    if (e.key === "Escape" && typing(e)) { e.target.blur(); return; }
    if (typing(e) || e.ctrlKey || e.metaKey || e.altKey) return;
    if (e.key === "/") {
      const search = document.querySelector("[data-slash-focus]");
      if (search) { search.focus(); search.select(); e.preventDefault(); }
      return;
    }
    if (e.key === "n") { go(document.querySelector("[data-key-next-page]")); return; }
    if (e.key === "p") { go(document.querySelector("[data-key-prev-page]")); return; }
    if (page === "rows" && cards.length) {
      const step = { ArrowRight: 1, ArrowLeft: -1, ArrowDown: columns(), ArrowUp: -columns(), j: 1, k: -1 }[e.key];
      if (step !== undefined) { select(selected < 0 ? 0 : selected + step); e.preventDefault(); return; }
      if (e.key === "Enter" && selected >= 0) { go(cards[selected].querySelector("a")); e.preventDefault(); }
      return;
    }
    if (page === "row") {
      if (e.key === "ArrowRight" || e.key === "j") { go(document.getElementById("next")); e.preventDefault(); return; }
      if (e.key === "ArrowLeft" || e.key === "k") { go(document.getElementById("prev")); e.preventDefault(); return; }
      if (e.key === "Escape" || e.key === "u") { go(document.getElementById("back")); return; }
      if (e.key === "b" && toggles.length) {
        const on = !toggles.every((t) => t.checked);
        toggles.forEach((t) => { t.checked = on; });
        applyToggles();
        return;
      }
      if (e.key === "l" && svg) { svg.classList.toggle("labels-off"); return; }
      const n = parseInt(e.key, 10);
      if (n >= 1 && n <= toggles.length) { toggles[n - 1].checked = !toggles[n - 1].checked; applyToggles(); }
    }
  });
})();
