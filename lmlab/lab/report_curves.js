// lmlab report: the interactive curves (the design is in report_curves.py).
// Reads the JSON block #lmlab-curves-data and draws one uPlot chart per metric into #lmlab-curves.
// uPlot is inlined in the page before this script; nothing is fetched.
(function () {
  "use strict";
  const CLOCKS = { step: "step", tokens: "tokens", time: "training time", wall: "wall-clock time" };
  const HEIGHT = 340;
  const hidden = new Set(); // labels of the runs the reader hid: hidden in every chart
  const charts = []; // [{spec, state, box, title, plot}]
  window.lmlabCharts = charts; // for the console and the browser test
  let syncing = false;

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text != null) e.textContent = text;
    return e;
  }

  function count(v) { // 1.2k, 3.4M: token counts
    const a = Math.abs(v);
    for (const [unit, size] of [["B", 1e9], ["M", 1e6], ["k", 1e3]]) {
      if (a >= size) return +(v / size).toPrecision(3) + unit;
    }
    return String(+v.toPrecision(4));
  }

  function number(v) {
    if (v == null) return "–";
    return Math.abs(v) >= 1e6 ? v.toExponential(3) : String(+v.toPrecision(5)); // small values: 5e-4, 1e-7
  }

  function movingAverage(ys, n) { // trailing mean of the last n finite values; a gap stays a gap
    if (n <= 1) return ys;
    const out = [], last = [];
    let sum = 0;
    for (const y of ys) {
      if (y == null) { out.push(null); continue; }
      last.push(y);
      sum += y;
      if (last.length > n) sum -= last.shift();
      out.push(sum / last.length);
    }
    return out;
  }

  function clockUnit(spec, clock) { // [divisor, unit]: seconds shown as s, min or h, as in the static figures
    if (clock !== "time" && clock !== "wall") return [1, ""];
    let max = 0;
    for (const run of spec.runs) for (const x of run.x[clock]) if (x != null && x > max) max = x;
    return max >= 7200 ? [3600, "h"] : max >= 120 ? [60, "min"] : [1, "s"];
  }

  function points(run, state, divisor) { // [xs, ys] of one run on the chosen clock, sorted by x
    const xs0 = run.x[state.clock], ys0 = movingAverage(run.y, state.smooth);
    const byX = new Map(); // a step logged twice (a resumed run) keeps its later value
    for (let i = 0; i < xs0.length; i++) {
      const x = xs0[i], y = ys0[i];
      if (x == null || (state.logx && x <= 0)) continue;
      byX.set(x / divisor, y == null || (state.logy && y <= 0) ? null : y);
    }
    const xs = [...byX.keys()].sort((a, b) => a - b);
    return [xs, xs.map((x) => byX.get(x))];
  }

  function yCap(spec, state) { // loss axes stop a little above the highest starting loss
    if (!spec.clip || state.logy) return Infinity;
    const firsts = spec.runs.map((r) => r.y.find((y) => y != null)).filter((y) => y != null && y > 0);
    return firsts.length ? 1.05 * Math.max(...firsts) : Infinity;
  }

  function linearRange(min, max, cap) {
    if (min == null || max == null) return [0, 1];
    if (max > cap && min < cap) max = cap;
    const pad = (max - min) * 0.05 || Math.abs(max) * 0.05 || 1;
    return [min - pad, max + pad];
  }

  function nearestPoint(u, si, i0) { // hover: each run's point nearest the cursor, none past its ends
    const ys = u.data[si], xs = u.data[0];
    if (si === 0 || ys[i0] != null) return i0;
    let lo = i0 - 1, hi = i0 + 1;
    while (lo >= 0 && ys[lo] == null) lo--;
    while (hi < ys.length && ys[hi] == null) hi++;
    if (lo < 0 || hi >= ys.length) return i0;
    return xs[i0] - xs[lo] <= xs[hi] - xs[i0] ? lo : hi;
  }

  function marker(ctx, kind, x, y, color, px) { // X: the run diverged; star: it reached its target
    ctx.save();
    ctx.fillStyle = ctx.strokeStyle = color;
    ctx.beginPath();
    if (kind === "diverged") {
      const r = 6 * px;
      ctx.lineWidth = 3 * px;
      ctx.moveTo(x - r, y - r); ctx.lineTo(x + r, y + r);
      ctx.moveTo(x - r, y + r); ctx.lineTo(x + r, y - r);
      ctx.stroke();
    } else {
      for (let k = 0; k < 10; k++) {
        const r = (k % 2 ? 3.5 : 9) * px, a = -Math.PI / 2 + (k * Math.PI) / 5;
        ctx.lineTo(x + r * Math.cos(a), y + r * Math.sin(a));
      }
      ctx.closePath();
      ctx.fill();
      ctx.lineWidth = px;
      ctx.strokeStyle = "#000";
      ctx.stroke();
    }
    ctx.restore();
  }

  function drawEnds(spec) { // uPlot draw hook: the end markers, on top of the curves
    return (u) => {
      const { left, top, width, height } = u.bbox;
      spec.runs.forEach((run, i) => {
        const ys = u.data[i + 1];
        if (!run.end || !u.series[i + 1].show) return;
        let j = ys.length - 1;
        while (j >= 0 && ys[j] == null) j--;
        if (j < 0) return;
        const y = Math.min(Math.max(ys[j], u.scales.y.min), u.scales.y.max); // above the cap: on the top edge
        const px = u.valToPos(u.data[0][j], "x", true), py = u.valToPos(y, "y", true);
        if (px < left - 1 || px > left + width + 1 || py < top - 1 || py > top + height + 1) return;
        marker(u.ctx, run.end, px, py, run.color, uPlot.pxRatio);
      });
    };
  }

  function syncHidden(spec) { // uPlot setSeries hook: a run hidden in one chart is hidden in all
    return (u, si, opts) => {
      if (syncing || si == null || si < 1 || opts.show == null) return;
      const label = spec.runs[si - 1].label;
      if (opts.show) hidden.delete(label); else hidden.add(label);
      syncing = true;
      try {
        for (const c of charts) {
          const k = c.spec.runs.findIndex((r) => r.label === label);
          if (c.plot && c.plot !== u && k >= 0 && c.plot.series[k + 1].show !== opts.show) {
            c.plot.setSeries(k + 1, { show: opts.show });
          }
        }
      } finally {
        syncing = false;
      }
    };
  }

  function runLabel(run) {
    return run.label + (run.end === "diverged" ? " (diverged)" : run.end === "target" ? " (target reached)" : "");
  }

  function options(spec, state, unit, width) {
    const xLabel = CLOCKS[state.clock] + (unit ? ` (${unit})` : "");
    const cap = yCap(spec, state);
    const y = { distr: state.logy ? 3 : 1 };
    if (!state.logy) y.range = (u, min, max) => linearRange(min, max, cap);
    const xValue = state.clock === "tokens" ? count : number;
    return {
      width, height: HEIGHT,
      scales: { x: { time: false, distr: state.logx ? 3 : 1 }, y },
      axes: [
        { label: xLabel, values: (u, splits) => splits.map((v) => (v == null ? "" : xValue(v))) },
        { label: spec.ylabel, size: 64, values: (u, splits) => splits.map((v) => (v == null ? "" : number(v))) },
      ],
      series: [{ label: xLabel, value: (u, v) => (v == null ? "–" : xValue(v)) }].concat(spec.runs.map((run) => ({
        label: runLabel(run), stroke: run.color, width: 1.5, show: !hidden.has(run.label),
        value: (u, v) => number(v),
      }))),
      cursor: { dataIdx: nearestPoint, drag: { x: true, y: false } },
      hooks: { draw: [drawEnds(spec)], setSeries: [syncHidden(spec)] },
    };
  }

  function draw(c) { // (re)build one chart from its state: clock, log scales and smoothing change the data
    if (c.plot) c.plot.destroy();
    c.plot = null;
    c.title.textContent = c.spec.title + (c.state.smooth > 1 ? ` (moving average of ${c.state.smooth} points)` : "");
    const [divisor, unit] = clockUnit(c.spec, c.state.clock);
    const data = uPlot.join(c.spec.runs.map((run) => points(run, c.state, divisor)));
    c.plot = new uPlot(options(c.spec, c.state, unit, c.box.clientWidth || 800), data, c.box);
  }

  function control(label, input, onChange) {
    const wrap = el("label", null, label + " ");
    wrap.append(input);
    input.addEventListener("change", onChange);
    return wrap;
  }

  function controls(c) {
    const bar = el("div", "controls");
    const clock = el("select");
    clock.name = "clock";
    for (const [key, name] of Object.entries(CLOCKS)) {
      const option = el("option", null, name);
      option.value = key;
      option.disabled = !c.spec.runs.some((run) => run.x[key].some((x) => x != null));
      clock.append(option);
    }
    clock.value = c.state.clock;
    bar.append(control("x axis:", clock, () => { c.state.clock = clock.value; draw(c); }));
    for (const axis of ["x", "y"]) {
      const box = el("input");
      box.type = "checkbox";
      box.name = "log" + axis;
      bar.append(control(`log ${axis}`, box, () => { c.state["log" + axis] = box.checked; draw(c); }));
    }
    const smooth = el("input");
    smooth.type = "number"; smooth.name = "smooth"; smooth.min = "1"; smooth.step = "1"; smooth.value = c.state.smooth;
    bar.append(control("smoothing (points):", smooth, () => {
      c.state.smooth = Math.max(1, Math.round(+smooth.value) || 1);
      smooth.value = c.state.smooth;
      draw(c);
    }));
    return bar;
  }

  function setup() {
    const root = document.getElementById("lmlab-curves");
    const data = JSON.parse(document.getElementById("lmlab-curves-data").textContent);
    root.append(el("p", "hint", "Hover for values; click a run in a legend to hide or show it in every chart; " +
      "drag across a chart to zoom in, double-click to zoom out."));
    for (const spec of data.charts) {
      const section = el("div", "chart");
      const c = { spec, state: { clock: spec.clock, logx: false, logy: false, smooth: spec.smooth }, box: el("div"), title: el("h3"), plot: null };
      section.dataset.metric = spec.metric;
      section.append(c.title, controls(c), c.box);
      root.append(section);
      charts.push(c);
    }
    charts.forEach(draw);
    addEventListener("resize", () => {
      for (const c of charts) if (c.plot) c.plot.setSize({ width: c.box.clientWidth || 800, height: HEIGHT });
    });
  }

  setup();
})();
