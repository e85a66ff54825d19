// The strip under the header: which run is served, its checkpoint's step and val loss, and the
// run's loss curve, all from GET /run. The curve is drawn here as SVG, with no chart library, so
// the page works offline. Values reach the page through textContent and attributes only.
"use strict";

(() => {
  const SVG = "http://www.w3.org/2000/svg";
  // The chart's own units (viewBox); CSS scales it to the page's width.
  const BOX = { width: 640, height: 200, left: 48, right: 16, top: 10, bottom: 28 };
  const MAX_MARKERS = 60; // more val points than this and their markers would hide the lines
  const SERIES = [
    { key: "loss", cls: "train", label: "train" },
    { key: "val_loss", cls: "val", label: "val" },
  ];
  const $ = (id) => document.getElementById(id);
  const count = (n) => n.toLocaleString("en-US");
  const compact = (n) => new Intl.NumberFormat("en-US", { notation: "compact" }).format(n);

  function svg(name, attrs, parent) {
    const el = document.createElementNS(SVG, name);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
    parent.append(el);
    return el;
  }

  function fact(id, text) {
    const span = document.createElement("span");
    span.id = id;
    span.textContent = text;
    $("run-facts").append(span);
  }

  function showFacts(info) {
    if (info.name) fact("run-name", `run ${info.name}`);
    if (info.step !== null) {
      const tokens = info.tokens !== null ? ` (${compact(info.tokens)} tokens)` : "";
      fact("run-step", `checkpoint step ${count(info.step)}${tokens}`);
    }
    if (info.val_loss !== null) {
      const bpb = info.val_bpb !== null ? `, ${info.val_bpb.toFixed(3)} bits/byte` : "";
      fact("run-val-loss", `val loss ${info.val_loss.toFixed(4)}${bpb}`);
    }
  }

  // About `n` round values (1, 2 or 5 times a power of ten apart) covering [lo, hi].
  function ticks(lo, hi, n) {
    const raw = (hi - lo) / n;
    const mag = 10 ** Math.floor(Math.log10(raw));
    const gap = [1, 2, 5, 10].map((m) => m * mag).find((g) => g >= raw);
    const out = [];
    for (let t = Math.ceil(lo / gap) * gap; t <= hi; t += gap) out.push(Number(t.toPrecision(12)));
    return out;
  }

  function extent(values) {
    let lo = Infinity;
    let hi = -Infinity;
    for (const v of values) {
      if (v === null) continue;
      lo = Math.min(lo, v);
      hi = Math.max(hi, v);
    }
    return [lo, hi];
  }

  // Maps steps and losses to chart coordinates, the losses padded 5% so no line touches an edge.
  function scales(curve) {
    const steps = curve.step;
    const x0 = steps[0];
    const x1 = steps[steps.length - 1] > x0 ? steps[steps.length - 1] : x0 + 1;
    let [y0, y1] = extent([...curve.loss, ...curve.val_loss]);
    const pad = (y1 - y0) * 0.05 || 0.5;
    [y0, y1] = [y0 - pad, y1 + pad];
    const { width: W, height: H, left: L, right: R, top: T, bottom: B } = BOX;
    return {
      x0, x1, y0, y1,
      x: (s) => L + ((s - x0) / (x1 - x0)) * (W - L - R),
      y: (v) => T + ((y1 - v) / (y1 - y0)) * (H - T - B),
    };
  }

  function drawAxes(chart, sc) {
    const { width: W, height: H, left: L, right: R, bottom: B } = BOX;
    for (const v of ticks(sc.y0, sc.y1, 5)) {
      svg("line", { class: "grid", x1: L, x2: W - R, y1: sc.y(v), y2: sc.y(v) }, chart);
      svg("text", { class: "tick", x: L - 6, y: sc.y(v) + 4, "text-anchor": "end" }, chart)
        .textContent = String(v);
    }
    for (const s of ticks(sc.x0, sc.x1, 6).filter(Number.isInteger)) {
      const anchor = sc.x(s) > W - R - 16 ? "end" : "middle"; // the last label stays in the box
      svg("text", { class: "tick", x: sc.x(s), y: H - B + 16, "text-anchor": anchor }, chart)
        .textContent = compact(s);
    }
    svg("text", { class: "axis", x: 4, y: 12 }, chart).textContent = "loss by step";
  }

  // One polyline per series with a vertex per logged step that has that loss; val points (few,
  // and the ones the checkpoint is judged by) also get a marker naming their value, unless they
  // are so many that the markers would bury the lines.
  function drawSeries(chart, curve, sc) {
    for (const { key, cls, label } of SERIES) {
      const at = curve.step.map((_, i) => i).filter((i) => curve[key][i] !== null);
      if (!at.length) continue;
      const xy = (i) => `${sc.x(curve.step[i]).toFixed(1)},${sc.y(curve[key][i]).toFixed(1)}`;
      const points = at.map(xy);
      const line = svg("polyline", { class: `series ${cls}`, points: points.join(" ") }, chart);
      line.dataset.steps = at.map((i) => curve.step[i]).join(",");
      if (at.length > 1 && (key !== "val_loss" || at.length > MAX_MARKERS)) continue;
      for (const i of at) {
        const [step, loss] = [curve.step[i], curve[key][i]];
        const dot = svg("circle", { class: `dot ${cls}`, cx: sc.x(step), cy: sc.y(loss), r: 2.5 },
          chart);
        svg("title", {}, dot).textContent = `step ${count(step)}: ${label} loss ${loss.toFixed(4)}`;
      }
    }
    SERIES.forEach(({ cls, label }, n) => {
      const [x, y] = [BOX.width - BOX.right - 110 + n * 55, BOX.top + 6];
      svg("line", { class: `series ${cls}`, x1: x, x2: x + 16, y1: y, y2: y }, chart);
      svg("text", { class: "tick", x: x + 20, y: BOX.top + 10 }, chart).textContent = label;
    });
  }

  // Under the pointer: a guide line at the nearest logged step, and its values in words.
  function followPointer(chart, curve, sc) {
    const guide = svg("line", { class: "guide", y1: BOX.top, y2: BOX.height - BOX.bottom }, chart);
    guide.style.display = "none";
    chart.addEventListener("pointermove", (event) => {
      const at = chart.createSVGPoint();
      [at.x, at.y] = [event.clientX, event.clientY];
      const step = sc.x0 + ((at.matrixTransform(chart.getScreenCTM().inverse()).x - BOX.left)
        / (BOX.width - BOX.left - BOX.right)) * (sc.x1 - sc.x0);
      let i = curve.step.findIndex((s) => s >= step);
      if (i < 0) i = curve.step.length - 1;
      if (i > 0 && step - curve.step[i - 1] < curve.step[i] - step) i -= 1;
      guide.setAttribute("x1", sc.x(curve.step[i]));
      guide.setAttribute("x2", sc.x(curve.step[i]));
      guide.style.display = "";
      const parts = [`step ${count(curve.step[i])}`];
      if (curve.tokens[i] !== null) parts.push(`${compact(curve.tokens[i])} tokens`);
      for (const { key, label } of SERIES) {
        if (curve[key][i] !== null) parts.push(`${label} loss ${curve[key][i].toFixed(4)}`);
      }
      $("curve-readout").textContent = parts.join(" · ");
    });
    chart.addEventListener("pointerleave", () => {
      guide.style.display = "none";
      $("curve-readout").textContent = "";
    });
  }

  function drawCurve(curve) {
    const chart = $("loss-curve");
    chart.setAttribute("viewBox", `0 0 ${BOX.width} ${BOX.height}`);
    chart.replaceChildren();
    const sc = scales(curve);
    drawAxes(chart, sc);
    drawSeries(chart, curve, sc);
    followPointer(chart, curve, sc);
    $("curve-panel").hidden = false;
  }

  async function loadRun() {
    let info;
    try {
      const resp = await fetch("/run");
      if (!resp.ok) return; // a server without run information: the chat works all the same
      info = await resp.json();
    } catch {
      return; // chat.js already says when the server cannot be reached
    }
    showFacts(info);
    if (info.curve) {
      drawCurve(info.curve);
    } else {
      $("curve-note").textContent = `Loss curve not available: ${info.curve_note}.`;
      $("curve-note").hidden = false;
    }
    $("run").hidden = false;
  }

  loadRun();
})();
