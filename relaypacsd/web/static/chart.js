/* A tiny SVG line chart for the dashboard (no library: nothing is loaded from the internet). */
(function () {
  "use strict";
  var NS = "http://www.w3.org/2000/svg";
  var COLORS = ["#1f5fa8", "#c2571a", "#2e8b57", "#8e44ad", "#b8860b", "#c62828"];

  function node(name, attrs, text) {
    var el = document.createElementNS(NS, name);
    Object.keys(attrs || {}).forEach(function (k) { el.setAttribute(k, attrs[k]); });
    if (text !== undefined) el.textContent = text;
    return el;
  }

  function niceMax(v) {
    if (v <= 4) return 4;
    var p = Math.pow(10, Math.floor(Math.log10(v))), m = v / p;
    return (m <= 2 ? 2 : m <= 5 ? 5 : 10) * p;
  }

  function clock(t) {
    var d = new Date(t * 1000);
    return String(d.getHours()).padStart(2, "0") + ":" + String(d.getMinutes()).padStart(2, "0");
  }

  /* Draw `series` ({name: [value or null, ...]}) over `times` (epoch seconds) into the <svg> `svg`. */
  function line(svg, times, series) {
    var W = 560, H = 220, L = 44, R = 10, T = 10, B = 40;
    var names = Object.keys(series).sort();
    var max = 0;
    names.forEach(function (n) { series[n].forEach(function (v) { if (v !== null && v > max) max = v; }); });
    max = niceMax(max);
    var x = function (i) { return L + (W - L - R) * (times.length < 2 ? 0 : i / (times.length - 1)); };
    var y = function (v) { return T + (H - T - B) * (1 - v / max); };
    var parts = [];
    for (var g = 0; g <= 4; g++) {
      var v = max * g / 4;
      parts.push(node("line", {"class": g ? "grid" : "axis", x1: L, x2: W - R, y1: y(v), y2: y(v)}));
      parts.push(node("text", {x: L - 6, y: y(v) + 4, "text-anchor": "end"}, String(Math.round(v))));
    }
    var ticks = 6;
    for (var k = 0; k <= ticks && times.length; k++) {
      var i = Math.round((times.length - 1) * k / ticks);
      parts.push(node("text", {x: x(i), y: H - B + 16, "text-anchor": k === 0 ? "start" : k === ticks ? "end" : "middle"}, clock(times[i])));
    }
    names.forEach(function (n, idx) {
      var color = COLORS[idx % COLORS.length], d = "", pen = false;
      series[n].forEach(function (v, i) {
        if (v === null) { pen = false; return; }
        d += (pen ? "L" : "M") + x(i).toFixed(1) + " " + y(v).toFixed(1) + " ";
        pen = true;
      });
      if (d) parts.push(node("path", {"class": "line", d: d, stroke: color, "data-series": n}));
      series[n].forEach(function (v, i) {  // a dot per sample: a lone minute shows too
        if (v !== null) parts.push(node("circle", {cx: x(i).toFixed(1), cy: y(v).toFixed(1), r: 2.5, fill: color,
                                                   "data-series": n, "data-value": v}));
      });
      parts.push(node("rect", {x: L + idx * 120, y: H - 14, width: 10, height: 10, fill: color}));
      parts.push(node("text", {x: L + idx * 120 + 14, y: H - 5}, n));
    });
    if (!names.length) parts.push(node("text", {x: W / 2, y: H / 2, "text-anchor": "middle"}, "no samples yet"));
    svg.replaceChildren.apply(svg, parts);  // one swap: the chart never blinks
  }

  window.MiniChart = {line: line};
})();
