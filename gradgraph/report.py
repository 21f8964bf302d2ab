"""The interactive report: one self-contained HTML file (plotly.js inlined; no CDN, no server).

Sections: the headline numbers, the component graph of one sentence (layers left to right,
positions top to bottom; hovering a node or an edge shows its label and its value by every method;
a method selector colours the nodes, a threshold slider hides the weaker edges), head × layer
heatmaps per method, the tokens of several items coloured by each method, and the tables. Drawing
is plotly's; the page's own script only turns the selector and the slider into plotly traces.
"""

from __future__ import annotations

import html
import json
import math

import plotly.graph_objects as go
import plotly.offline

from gradgraph.arch.names import METRIC
from gradgraph.bootstrap import MIN_ITEMS, cell, intervals_note
from gradgraph.labels import Registry

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.6em 0; }
td, th { border: 1px solid #ddd; padding: 3px 7px; text-align: right; } th { background: #f4f4f4; }
td:first-child, th:first-child { text-align: left; }
.headline { display: flex; flex-wrap: wrap; gap: 1em; }
.headline div { background: #f4f6fa; padding: 0.6em 1em; border-radius: 6px; }
.headline b { display: block; font-size: 1.4em; }
.tokens span.t { padding: 1px 3px; margin: 1px; border-radius: 3px; display: inline-block; }
.tokens span.subject { outline: 2px solid #222; } .tokens span.attractor { outline: 2px dashed #888; }
.tokens td { text-align: left; } .controls { margin: 0.5em 0; } .controls label { margin-right: 1.5em; }
figure { display: inline-block; margin: 0.5em; } figure img { max-width: 560px; border: 1px solid #eee; }
"""

_GRAPH_SCRIPT = """
(function () {
  const G = JSON.parse(document.getElementById('gg-graph-data').textContent);
  // within a layer, left to right: query inputs, key inputs, value inputs, head outputs, the MLP
  const place = label => G.places[label];  // [x, y] of each component, from its parsed label (_places)
  const labels = Object.keys(G.nodes);
  const methods = Object.keys(G.methods);
  const select = document.getElementById('gg-method');
  const slider = document.getElementById('gg-threshold');
  const shown = document.getElementById('gg-visible');
  const fmt = v => (v === null || v === undefined) ? 'n/a' : Number(v).toPrecision(3);
  function describe(values, names) {
    return Object.keys(names).map(m => names[m] + ': ' + fmt(values[m])).join('<br>');
  }
  window.ggReport = {nodeCount: labels.length, visibleEdges: 0};
  function render() {
    const method = select.value;
    const edgeMethod = (method in G.edge_methods) ? method : 'flow';
    const top = Math.max(1e-300, ...G.edges.map(e => e.values[edgeMethod] || 0));
    const threshold = (+slider.value / 100) * top;
    const kept = G.edges.filter(e => (e.values[edgeMethod] || 0) >= threshold && (e.values[edgeMethod] || 0) > 0);
    const traces = [];
    const bins = [0.25, 0.5, 0.75, 1.01];
    [false, true].forEach(across => bins.forEach((upper, i) => {
      const x = [], y = [];
      kept.filter(e => e.values[edgeMethod] / top < upper && e.values[edgeMethod] / top >= (i ? bins[i - 1] : 0))
        .filter(e => (place(e.source)[1] !== place(e.target)[1]) === across)
        .forEach(e => { const a = place(e.source), b = place(e.target); x.push(a[0], b[0], null); y.push(a[1], b[1], null); });
      const colour = across ? '196,78,82' : '76,114,176';  // red: attention moves it across positions
      traces.push({x, y, mode: 'lines', type: 'scatter', hoverinfo: 'skip', showlegend: false,
                   line: {width: 0.8 + 4 * upper, color: 'rgba(' + colour + ',' + (0.35 + 0.6 * upper) + ')'}});
    }));
    traces.push({type: 'scatter', mode: 'markers', showlegend: false, marker: {size: 5, color: 'rgba(0,0,0,0)'},
                 x: kept.map(e => (place(e.source)[0] + place(e.target)[0]) / 2),
                 y: kept.map(e => (place(e.source)[1] + place(e.target)[1]) / 2),
                 hovertemplate: '%{text}<extra></extra>',
                 text: kept.map(e => e.source + ' → ' + e.target + '<br>' + describe(e.values, G.edge_methods))});
    const touched = new Set(kept.flatMap(e => [e.source, e.target]));
    const drawn = labels.filter(l => touched.has(l) || G.anchors.includes(l));
    const values = drawn.map(l => G.nodes[l][method]);
    const finite = values.filter(v => v !== null && v !== undefined);
    const signed = finite.some(v => v < 0);
    const scale = Math.max(1e-300, ...finite.map(Math.abs));
    traces.push({type: 'scatter', mode: 'markers', showlegend: false,
                 x: drawn.map(l => place(l)[0]), y: drawn.map(l => place(l)[1]),
                 marker: {size: 9, line: {width: 0.5, color: '#333'},
                          color: values.map(v => (v === null || v === undefined) ? 0 : v),
                          colorscale: signed ? 'RdBu' : 'Viridis', reversescale: signed,
                          cmin: signed ? -scale : 0, cmax: scale, colorbar: {title: {text: G.methods[method]}}},
                 hovertemplate: '%{text}<extra></extra>',
                 text: drawn.map(l => '<b>' + l + '</b><br>' + describe(G.nodes[l], G.methods))});
    const layout = {height: 110 + 34 * G.n_tokens, margin: {l: 140, r: 20, t: 10, b: 40}, hovermode: 'closest',
                    xaxis: {title: {text: 'layer (embeddings left, metric right)'}, zeroline: false},
                    yaxis: {autorange: 'reversed', tickvals: G.tokens.map((_, i) => i),
                            ticktext: G.tokens.map((t, i) => i + ': ' + JSON.stringify(t)), zeroline: false}};
    Plotly.react('gg-graph', traces, layout, {responsive: true});
    window.ggReport.visibleEdges = kept.length;
    window.ggReport.visibleNodes = drawn.length;
    shown.textContent = kept.length + ' of ' + G.edges.length + ' edges and ' + drawn.length + ' of ' + labels.length +
                        ' components shown (' + G.edge_methods[edgeMethod] + ' ≥ ' + slider.value +
                        ' % of the strongest edge; blue: within a position, red: across positions)';
  }
  methods.forEach(m => { const o = document.createElement('option'); o.value = m; o.textContent = G.methods[m]; select.appendChild(o); });
  select.addEventListener('change', render);
  slider.addEventListener('input', render);
  render();
})();
"""


def _places(graph: dict, registry: Registry) -> dict[str, list[float]]:
    """Where the component graph draws each node: x = layer (within a layer, left to right: query
    inputs, key inputs, value inputs, head outputs, the MLP; embeddings left, the metric right),
    y = position."""
    H, K = registry.n_heads, registry.n_key_value_heads
    slots = 2 * H + 2 * K + 1
    first = {"q": 0, "k": H, "v": H + K, "head": H + 2 * K}
    places = {}
    for label in graph["nodes"]:
        if label == METRIC:
            places[label] = [registry.n_layers + 0.5, graph["n_tokens"] - 1]
            continue
        c = registry.parse(label)
        if c.kind == "embed":
            x = -1.0
        elif c.kind == "mlp":
            x = c.layer + 0.4
        else:
            x = c.layer - 0.4 + 0.8 * (first[c.kind] + c.head) / (slots - 1)
        places[label] = [x, c.position]
    return places


def _intervals(rows: list[dict]) -> str:
    """What the agreement table's intervals are, or why it has none."""
    note = intervals_note(rows)
    if note:
        return (f"<b>{html.escape(note)}</b>: with fewer items a bootstrap interval's coverage is too poor to "
                f"read, and the estimates themselves are rough.")
    return (f"95 % basic bootstrap intervals over items, for the value over infinitely many items: a ρ over "
            f"few items is biased towards 0, so an interval can lie above its estimate (none below {MIN_ITEMS} "
            f"items).")


def _table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title in columns)
    body = []
    for row in rows:
        cells = []
        for key, _ in columns:
            value = row.get(key) if not callable(key) else key(row)
            cells.append(f"<td>{html.escape(_fmt(value))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _pivot(rows: list[dict]) -> list[dict]:
    """One row per method and ground truth: ρ [interval] per component group, the heads' top-k overlap."""
    out: dict[tuple[str, str], dict] = {}
    for r in rows:
        row = out.setdefault((r["method"], r["truth"]), dict(method=r["method"], truth=r["truth"]))
        row[r["group"]] = cell(r)
        if r["group"] == "heads":
            row["overlap"] = cell(r, "overlap")
    return list(out.values())


def _fmt(value) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.3f}"
    return "" if value is None else str(value)


def _colour(value: float | None, top: float) -> str:
    if value is None or top <= 0:
        return "#eeeeee"
    level = min(1.0, abs(value) / top)
    fade = int(255 * (1 - 0.8 * level))
    return f"rgb(255,{fade},{fade})" if value >= 0 else f"rgb({fade},{fade},255)"


def _tokens(items: list[dict]) -> str:
    """Each item's tokens, one row per method, coloured by score (red +, blue −, per row's max)."""
    out = []
    for item in items:
        rows = []
        for method, scores in item["scores"].items():
            if all(s is None for s in scores):
                continue  # the method did not run on this item (UDIG runs on the intervention items)
            finite = [abs(s) for s in scores if s is not None]
            top = max(finite, default=0.0)
            spans = []
            for p, (token, value) in enumerate(zip(item["tokens"], scores)):
                role = " subject" if p == item["subject"] else (" attractor" if p in item["attractors"] else "")
                title = f"{method}: {_fmt(value)}"
                spans.append(f'<span class="t{role}" style="background:{_colour(value, top)}" '
                             f'title="{html.escape(title)}">{html.escape(token)}</span>')
            rows.append(f"<tr><td>{html.escape(method)}</td><td>{''.join(spans)}</td></tr>")
        out.append(f"<h3>{html.escape(item['prefix'])} <small>({html.escape(item['condition'])})</small></h3>"
                   f"<table class='tokens'>{''.join(rows)}</table>")
    return "\n".join(out)


def _heatmaps(heat: dict, div_id: str) -> str:
    """Head × layer heatmaps, a dropdown to choose the method."""
    names = list(heat)
    fig = go.Figure()
    for i, name in enumerate(names):
        values = heat[name].tolist()
        fig.add_trace(go.Heatmap(z=values, colorscale="Viridis", visible=i == 0, name=name,
                                 hovertemplate="layer %{y}, head %{x}<br>" + name + ": %{z:.3g}<extra></extra>"))
    buttons = [dict(label=name, method="update", args=[{"visible": [j == i for j in range(len(names))]}])
               for i, name in enumerate(names)]
    fig.update_layout(updatemenus=[dict(buttons=buttons, x=0, y=1.12, xanchor="left")], height=620,
                      xaxis_title="head", yaxis_title="layer", margin=dict(t=60))
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id)


def sva_page(summary: dict, result, heat: dict, figures: dict[str, str]) -> str:
    """The SVA study's page (``result``: ``gradgraph.studies.sva.Result``)."""
    overall = next(r for r in summary["accuracy"] if r["condition"] == "all")
    best = {}
    for r in summary["agreement"]:
        if r["group"] == "heads" and r["truth"] == "activation patching":
            best[r["method"]] = r
    leader = max(best.values(), key=lambda r: r["spearman"]) if best else None
    headline = [("accuracy", f"{overall['accuracy']:.3f}", f"{overall['n']} items"),
                ("items", f"{summary['items_analysed']} / {summary['items_intervened']}", "graph methods / interventions"),
                ("methods", str(len(summary["methods"])), ", ".join(summary["methods"])),
                ("run time", f"{summary['seconds'] / 60:.1f} min", "2-core CPU" if summary.get("cpu") else "")]
    if leader:
        headline.insert(1, ("best head ranking", f"ρ = {leader['spearman']:+.2f}",
                            f"{leader['method']} vs activation patching"))
    cards = "".join(f"<div>{html.escape(a)}<b>{html.escape(b)}</b><small>{html.escape(c)}</small></div>"
                    for a, b, c in headline)
    agreement = _table(_pivot(summary["agreement"]), [("method", "method"), ("truth", "ground truth")] + [
        (key, title) for key, title in (("heads", "heads ρ"), ("q/k/v inputs", "q/k/v inputs ρ"), ("MLPs", "MLPs ρ"),
                                        ("all", "all ρ"), ("overlap", "top-10 heads overlap"))])
    wins = _table(summary["subject_wins"], [("method", "method"), ("condition", "condition"),
                                            (lambda r: "any" if r["n_attractors"] is None else r["n_attractors"],
                                             "attractors"), ("n", "items"), ("subject_wins", "subject > every attractor")])
    shares_rows = [dict(method=name.split("/")[1], **row) for name, rows in summary["subject_last_layers"].items()
                   if name.startswith("subject/") for row in rows]
    shares = _table(shares_rows, [("method", "method"), ("layer", "layer"), ("q", "q"), ("k", "k"), ("v", "v"),
                                  ("skip", "skip")])
    entropy = _table(summary["entropy"], [("condition", "condition"), ("n_attractors", "attractors"), ("n", "n"),
                                          ("path_entropy", "entropy (nats)"), ("normalised_entropy", "entropy / log N"),
                                          ("log_paths", "log N")])
    paths = []
    for ex in summary["examples"]:
        items = "".join(f"<li>{p['weight']:+.3g}: {html.escape(' → '.join(p['components']))}</li>"
                        for p in ex["from_subject"])
        paths.append(f"<p>{html.escape(repr(ex['prefix']))} → {html.escape(repr(ex['good']))} "
                     f"(subject at position {ex['subject']})</p><ul>{items}</ul>")
    graph_section = "<p>No example sentence with attractors among the analysed items.</p>"
    if result.graph is not None:
        places = _places(result.graph, result.registry)
        anchors = [label for label, (x, _) in places.items() if x < 0 or label == METRIC]  # the inputs and the metric
        payload = dict(result.graph, n_layers=result.n_layers, places=places, anchors=anchors)
        data = json.dumps(payload).replace("</", "<\\/")
        graph_section = (
            f"<p>{html.escape(repr(result.graph['prefix']))} → {html.escape(repr(result.graph['good']))} vs "
            f"{html.escape(repr(result.graph['bad']))}. Edges: flow between components (gradient flow or best "
            f"path; hover for both); nodes coloured by the chosen method.</p>"
            "<div class='controls'><label>method <select id='gg-method'></select></label>"
            "<label>edges ≥ <input id='gg-threshold' type='range' min='0' max='60' value='5'> % of the strongest</label>"
            "<span id='gg-visible'></span></div><div id='gg-graph'></div>"
            f"<script type='application/json' id='gg-graph-data'>{data}</script>")
    gallery = "".join(f"<figure><a href='{html.escape(link)}'><img src='{html.escape(link)}' alt='{html.escape(name)}'>"
                      f"</a><figcaption>{html.escape(name)}</figcaption></figure>" for name, link in figures.items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>gradgraph: subject–verb agreement in {html.escape(summary['model'])}</title>
<style>{_STYLE}</style>
<script type="text/javascript">{plotly.offline.get_plotlyjs()}</script></head>
<body>
<h1>Subject–verb agreement in {html.escape(summary['model'])}</h1>
<div class="headline">{cards}</div>
<h2>Which components carry agreement: every method against interventions</h2>
<p>A component's importance is the mean over the intervened items of |score| (|effect| for mean ablation
and activation patching); Spearman ρ between the two, and the overlap of their top-k components, with
{_intervals(summary["agreement"])} Tables: <a href="agreement.csv">agreement.csv</a>,
<a href="components.csv">components.csv</a>.</p>
{agreement}
<h2>Component graph</h2>
{graph_section}
<h2>Heads by method</h2>
{_heatmaps(heat, "gg-heatmaps")}
<h2>Tokens by method</h2>
<p>Red: the token supports the agreeing verb, blue: the other; each row on its own scale. Subject outlined,
attractors dashed.</p>
<div class="tokens">{_tokens(result.tokens)}</div>
<h2>The subject against the attractors</h2>
{wins}
<h2>q/k/v/skip shares at the subject token (last layers)</h2>
{shares}
<h2>Path entropy</h2>
{entropy}
<h2>Best component paths from the subject</h2>
{''.join(paths)}
<h2>Figures</h2>
{gallery}
<script type="text/javascript">{_GRAPH_SCRIPT if result.graph is not None else ''}</script>
</body></html>
"""


def heads_page(summary: dict, heat: dict, tokens: list[dict], figures: dict[str, str]) -> str:
    """``gradgraph heads``' page: agreement with interventions, heatmaps per method, tokens."""
    agreement = (_table(_pivot(summary["agreement"]), [("method", "method"), ("truth", "ground truth")] + [
        (key, title) for key, title in (("heads", "heads ρ"), ("q/k/v inputs", "q/k/v inputs ρ"), ("MLPs", "MLPs ρ"),
                                        ("all", "all ρ"), ("overlap", "top-10 heads overlap"))])
                 if summary["agreement"] else "<p>No intervention to compare with.</p>")
    gallery = "".join(f"<figure><a href='{html.escape(link)}'><img src='{html.escape(link)}' alt='{html.escape(name)}'>"
                      f"</a><figcaption>{html.escape(name)}</figcaption></figure>" for name, link in figures.items())
    title = f"Heads for logit({summary['good']!r}) − logit({summary['bad']!r}) in {summary['model']}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>gradgraph: {html.escape(title)}</title>
<style>{_STYLE}</style>
<script type="text/javascript">{plotly.offline.get_plotlyjs()}</script></head>
<body>
<h1>{html.escape(title)}</h1>
<div class="headline"><div>prompts<b>{summary['prompts']}</b></div>
<div>methods<b>{len(summary['methods'])}</b><small>{html.escape(', '.join(summary['methods']))}</small></div></div>
<h2>Every method against interventions</h2>
<p>Importance: mean over prompts of |score| (|effect|); Spearman ρ and top-k overlap with
{_intervals(summary["agreement"])} Tables: <a href="heads.csv">heads.csv</a>, <a href="agreement.csv">agreement.csv</a>.</p>
{agreement}
<h2>Heads by method</h2>
{_heatmaps(heat, "gg-heatmaps")}
<h2>Tokens by method</h2>
<div class="tokens">{_tokens(tokens)}</div>
<h2>Figures</h2>
{gallery}
</body></html>
"""


def _curves(curves: dict[str, dict[str, tuple]], div_id: str) -> str:
    """f(C) against each circuit's own share of the edges (log x), a line per method; a dropdown
    chooses the signed (CPR's) or the absolute (CMD's) selection."""
    fig, selections = go.Figure(), ("absolute", "signed")
    for selection in selections:
        for method, by in curves.items():
            shares, f = by[selection]
            fig.add_trace(go.Scatter(x=[100 * x for x in shares], y=f, mode="lines+markers", name=method,
                                     visible=selection == "absolute",
                                     line=dict(dash="dash" if method == "random" else "solid"),
                                     hovertemplate=method + ": %{x:.3g} % of the edges, f = %{y:.3f}<extra></extra>"))
    n = len(curves)
    buttons = [dict(label=f"{s} selection ({'CMD' if s == 'absolute' else 'CPR'})", method="update",
                    args=[{"visible": [j // n == i for j in range(2 * n)]}]) for i, s in enumerate(selections)]
    fig.update_layout(updatemenus=[dict(buttons=buttons, x=0, y=1.15, xanchor="left")], height=460,
                      xaxis=dict(type="log", title="edges in the circuit (% of the model's, its own share)"),
                      yaxis_title="faithfulness f(C)", margin=dict(t=60))
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id)


def _circuits(layouts: dict, div_id: str) -> str:
    """Each method's circuit, layers left to right (a dropdown per method); hovering an edge shows its
    label and score, its colour the input it enters."""
    colours = {"q": "#1f77b4", "k": "#2ca02c", "v": "#ff7f0e", "mlp": "#9467bd", "logits": "#222222"}
    fig, spans = go.Figure(), []
    for layout in layouts.values():
        first = len(fig.data)
        top = max((abs(e.score) for e in layout.edges), default=0.0) or 1.0
        for e in layout.edges:
            (x0, y0), (x1, y1) = layout.places[e.upstream], layout.places[e.component]
            fig.add_trace(go.Scatter(x=[x0, (x0 + x1) / 2, x1], y=[y0, (y0 + y1) / 2, y1], mode="lines",
                                     line=dict(color=colours[e.kind], width=0.5 + 4 * abs(e.score) / top,
                                               dash="solid" if e.score >= 0 else "dash"),
                                     hovertemplate=f"{e.upstream} → {e.input}: {e.score:.3g}<extra></extra>",
                                     showlegend=False, visible=not spans))
        labels = list(layout.places)
        fig.add_trace(go.Scatter(x=[layout.places[k][0] for k in labels], y=[layout.places[k][1] for k in labels],
                                 mode="markers+text", text=labels, textposition="top center", showlegend=False,
                                 marker=dict(size=9, color="white", line=dict(color="black", width=1)),
                                 hovertemplate="%{text}<extra></extra>", visible=not spans))
        spans.append((first, len(fig.data)))
    buttons = [dict(label=method, method="update",
                    args=[{"visible": [a <= j < b for j in range(len(fig.data))]}])
               for method, (a, b) in zip(layouts, spans)]
    fig.update_layout(updatemenus=[dict(buttons=buttons, x=0, y=1.12, xanchor="left")], height=560,
                      xaxis=dict(title="embed · layers · logits", zeroline=False), yaxis=dict(visible=False),
                      margin=dict(t=60))
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id)


def circuit_page(summary: dict, curves: dict, layouts: dict, figures: dict[str, str]) -> str:
    """``gradgraph circuit``'s page: CPR/CMD per method under both x-axis conventions, the curves, each
    method's circuit drawn, the figures and the files."""
    table = _table(summary["rows"], [("method", "method"), ("x_axis", "x-axis"),
                                     (lambda r: f"{r['CPR']:.3f} [{r['CPR_low']:.3f}, {r['CPR_high']:.3f}]", "CPR ↑"),
                                     (lambda r: f"{r['CMD']:.3f} [{r['CMD_low']:.3f}, {r['CMD_high']:.3f}]", "CMD ↓"),
                                     ("seconds", "seconds")])
    gallery = "".join(f"<figure><a href='{html.escape(link)}'><img src='{html.escape(link)}' alt='{html.escape(name)}'>"
                      f"</a><figcaption>{html.escape(name)}</figcaption></figure>" for name, link in figures.items())
    files = ", ".join(f"<a href='circuits/{m}.json'>{m}</a>" for m in layouts)
    title = f"Circuits of {summary['task']} in {summary['model']}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>gradgraph: {html.escape(title)}</title>
<style>{_STYLE}</style>
<script type="text/javascript">{plotly.offline.get_plotlyjs()}</script></head>
<body>
<h1>{html.escape(title)}</h1>
<div class="headline"><div>edges in the model<b>{summary['edges']}</b></div>
<div>methods<b>{len(layouts)}</b><small>{html.escape(', '.join(layouts))}</small></div>
<div>metric<b>logit(good) − logit(bad)</b></div></div>
<h2>Faithfulness: CPR and CMD</h2>
<p>MIB's areas (Mueller et al. 2025) under f(C) = (m(C) − m(∅)) / (m(N) − m(∅)) over its ten circuit sizes,
edges outside the circuit given their counterfactual values. CPR (higher is better) from circuits chosen by the
signed score, CMD (lower is better) by |score|. x-axis <b>fixed</b>: the sizes asked for (the public
leaderboard's convention); <b>own</b>: each pruned circuit's own share of the edges (the paper's). 95 %
bootstrap intervals over prompts. Tables: <a href="cpr_cmd.csv">cpr_cmd.csv</a>, <a href="curves.csv">curves.csv</a>.</p>
{table}
{_curves(curves, "gg-curves")}
<h2>The circuits</h2>
<p>Each method's circuit of {summary['size']:.1%} of the edges (pruned), in EAP-IG's graph JSON ({files}) and
circuit-tracer's (<code>circuit_tracer/</code>); the edges ranked in <code>edges/</code>.</p>
{_circuits(layouts, "gg-circuits")}
<h2>Figures</h2>
{gallery}
</body></html>
"""


__all__ = ["circuit_page", "heads_page", "sva_page"]
