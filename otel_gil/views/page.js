// otel-gil HTML view: draws the timeline from the JSON in #data (html.py).
// Plain DOM and SVG, no library. Text from the record (thread names, frames)
// is only ever set as textContent, never parsed as HTML.
"use strict";
(function () {
  const NS = "http://www.w3.org/2000/svg";
  const KINDS = ["hold", "wait", "span"];
  const LABEL_W = 230, LANE_H = 26, AXIS_H = 22, RIGHT = 12, MAX_FLOWS = 1500;
  const data = JSON.parse(document.getElementById("data").textContent);
  const svg = document.getElementById("timeline");
  const tip = document.getElementById("tip");
  const status = document.getElementById("status");
  const total = Math.max(data.duration_ns, 1);
  let view = [0, total];

  function el(name, attrs, parent) {
    const node = document.createElementNS(NS, name);
    for (const k in attrs) node.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(node);
    return node;
  }

  function width() { return Math.max(svg.clientWidth || 1200, LABEL_W + 100); }
  function x(t, w) { return LABEL_W + (t - view[0]) / (view[1] - view[0]) * (w - LABEL_W - RIGHT); }
  function laneY(i) { return AXIS_H + i * LANE_H; }

  function niceStep(span) {
    const raw = span / 8, p = Math.pow(10, Math.floor(Math.log10(raw)));
    for (const m of [1, 2, 5, 10]) if (m * p >= raw) return m * p;
    return 10 * p;
  }

  // A time with as many decimals as the step needs: ms, or s from 1 s steps on.
  function fmtMs(ns, step) {
    const unit = step >= 1e9 ? 1e9 : 1e6;
    const digits = Math.max(0, Math.min(6, -Math.floor(Math.log10(step / unit))));
    return (ns / unit).toFixed(digits) + (unit === 1e9 ? " s" : " ms");
  }

  function drawAxis(g, w, h) {
    const step = niceStep(view[1] - view[0]);
    for (let t = Math.ceil(view[0] / step) * step; t <= view[1]; t += step) {
      const px = x(t, w);
      el("line", {class: "grid", x1: px, x2: px, y1: AXIS_H - 4, y2: h}, g);
      if (px < w - 70) el("text", {x: px + 2, y: 13}, g).textContent = fmtMs(t, step);
    }
  }

  function drawLanes(g, w) {
    data.threads.forEach(function (t, i) {
      el("rect", {class: "lane-bg" + (i % 2 ? " odd" : ""), x: 0, y: laneY(i), width: w,
                  height: LANE_H}, g);
      const label = el("text", {class: "track-label", x: 6, y: laneY(i) + 17}, g);
      label.textContent = t.name.length > 30 ? t.name.slice(0, 29) + "\u2026" : t.name;
    });
  }

  // One rect per slice; slices under a pixel wide that touch are merged, so a
  // long record stays a few thousand elements at any zoom.
  function drawSlices(g, w) {
    const last = {};
    let drawn = 0;
    data.slices.forEach(function (s, i) {
      if (s[3] < view[0] || s[2] > view[1]) return;
      const x0 = Math.max(x(s[2], w), LABEL_W), x1 = Math.min(x(s[3], w), w - RIGHT);
      const key = s[0] + ":" + s[1], prev = last[key];
      if (x1 - x0 < 1 && prev && x0 - prev.end < 1) {
        prev.end = Math.max(prev.end, x0 + 1);
        prev.rect.setAttribute("width", prev.end - prev.start);
        prev.rect.setAttribute("data-merged", "1");
        return;
      }
      const top = s[0] === 2 ? 2 : 6, hgt = s[0] === 2 ? 4 : LANE_H - 10;
      const rect = el("rect", {class: "slice " + KINDS[s[0]], x: x0, y: laneY(s[1]) + top,
                               width: Math.max(x1 - x0, 1), height: hgt, "data-i": i}, g);
      last[key] = {start: x0, end: Math.max(x1, x0 + 1), rect: rect};
      drawn++;
    });
    return drawn;
  }

  function drawFlows(g, w) {
    const visible = data.flows.filter(function (f) { return f[3] >= view[0] && f[2] <= view[1]; });
    if (visible.length > MAX_FLOWS) return -visible.length;
    visible.forEach(function (f) {
      const from = data.slices[f[0]], to = data.slices[f[1]];
      const x0 = x(f[2], w), x1 = x(f[3], w);
      const y0 = laneY(from[1]) + LANE_H / 2, y1 = laneY(to[1]) + LANE_H / 2;
      el("path", {class: "flow", "marker-end": "url(#arrow)",
                  d: "M" + x0 + "," + y0 + " C" + (x0 + x1) / 2 + "," + y0 + " " +
                     (x0 + x1) / 2 + "," + y1 + " " + x1 + "," + y1}, g);
    });
    return visible.length;
  }

  function draw() {
    const w = width(), h = laneY(data.threads.length) + 4;
    svg.setAttribute("viewBox", "0 0 " + w + " " + h);
    svg.setAttribute("height", h);
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    const defs = el("defs", {}, svg);
    const marker = el("marker", {id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5,
                                 markerWidth: 7, markerHeight: 7, orient: "auto"}, defs);
    el("path", {d: "M0,0 L10,5 L0,10 z", fill: "#333"}, marker);
    const lanes = el("g", {class: "lanes"}, svg), axis = el("g", {class: "axis"}, svg);
    drawLanes(lanes, w);
    drawAxis(axis, w, h);
    const slices = drawSlices(el("g", {class: "slices"}, svg), w);
    const flows = drawFlows(el("g", {class: "flows"}, svg), w);
    status.textContent = data.threads.length + " tracks, " + slices + " slices drawn, " +
      (flows < 0 ? (-flows) + " arrows here: zoom in to draw them" : flows + " arrows") +
      "; showing " + fmtMs(view[0], view[1] - view[0]) + " to " + fmtMs(view[1], view[1] - view[0]);
  }

  function timeAt(clientX) {
    const r = svg.getBoundingClientRect(), w = width();
    const px = (clientX - r.left) * w / r.width;
    return view[0] + (px - LABEL_W) / (w - LABEL_W - RIGHT) * (view[1] - view[0]);
  }

  svg.addEventListener("wheel", function (e) {
    e.preventDefault();
    const at = timeAt(e.clientX), f = e.deltaY > 0 ? 1.25 : 0.8;
    const span = Math.min(total, Math.max(1000, (view[1] - view[0]) * f));
    const left = Math.max(0, Math.min(total - span, at - (at - view[0]) * span / (view[1] - view[0])));
    view = [left, left + span];
    draw();
  }, {passive: false});

  let drag = null;
  svg.addEventListener("mousedown", function (e) { drag = {x: e.clientX, view: view.slice()}; });
  window.addEventListener("mouseup", function () { drag = null; });
  window.addEventListener("mousemove", function (e) {
    if (!drag) return;
    const r = svg.getBoundingClientRect(), span = drag.view[1] - drag.view[0];
    const dt = (drag.x - e.clientX) * width() / r.width / (width() - LABEL_W - RIGHT) * span;
    const left = Math.max(0, Math.min(total - span, drag.view[0] + dt));
    view = [left, left + span];
    draw();
  });
  svg.addEventListener("dblclick", function () { view = [0, total]; draw(); });

  svg.addEventListener("mousemove", function (e) {
    const i = e.target.getAttribute && e.target.getAttribute("data-i");
    if (i === null || i === undefined || drag) { tip.hidden = true; return; }
    tip.textContent = e.target.getAttribute("data-merged") ?
      "several slices under a pixel wide: zoom in" : data.tips[+i];
    const box = svg.parentNode.getBoundingClientRect();
    tip.style.left = Math.min(e.clientX - box.left + 12, box.width - 320) + "px";
    tip.style.top = (e.clientY - box.top + 14) + "px";
    tip.hidden = false;
  });
  svg.addEventListener("mouseleave", function () { tip.hidden = true; });
  window.addEventListener("resize", draw);
  draw();
  document.body.setAttribute("data-rendered", "timeline");  // for a headless check
})();
