"""Turn results into the table, the PASS/MISS targets, SVG bar charts and docs/benchmarks.md."""

from __future__ import annotations

import html

from harness.env import REPO_DIR, RESULTS_DIR
from harness.workloads import RSS_LIMIT_MB, TARGET_LIMITS, TARGETS

DOC = REPO_DIR / "docs" / "benchmarks.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"


def _median(wl: dict, tool: str) -> float | None:
    entry = wl.get("tools", {}).get(tool, {})
    value = entry.get("median_s")
    return float(value) if value is not None else None


def evaluate_target(key: str, wl: dict) -> dict[str, object]:
    """PASS / MISS / n/a for one workload, with the ratio it was judged on."""
    fp = _median(wl, "fetchpool") if key != "startup" else wl.get("median_s")
    if fp is None:
        return {"target": TARGETS[key], "status": "n/a", "why": "fetchpool not measured"}
    if key == "startup":
        return {
            "target": TARGETS[key],
            "status": "PASS" if fp <= 0.3 else "MISS",
            "value": f"{fp:.3f} s",
        }
    if key in ("W1", "W2", "W4"):
        peer, limit = TARGET_LIMITS[key]
        ref = _median(wl, peer)
        if ref is None:
            return {"target": TARGETS[key], "status": "n/a", "why": f"{peer} not measured"}
        ratio = fp / ref
        if key != "W4":
            return {
                "target": TARGETS[key],
                "status": "PASS" if ratio <= limit else "MISS",
                "value": f"{ratio:.2f} x {peer}",
            }
        rss = float(wl["tools"]["fetchpool"]["tree_rss_mb"])
        return {
            "target": TARGETS[key],
            "status": "PASS" if ratio <= limit and rss <= RSS_LIMIT_MB else "MISS",
            "value": f"{ratio:.2f} x {peer}, peak RSS {rss:.0f} MB",
        }
    if key in ("W3", "W6"):
        ref = _median(wl, "img2dataset")
        if ref is None:
            return {"target": TARGETS[key], "status": "n/a", "why": "img2dataset not measured"}
        speedup = ref / fp
        return {
            "target": TARGETS[key],
            "status": "PASS" if speedup >= TARGET_LIMITS[key][1] else "MISS",
            "value": f"{speedup:.2f} x faster",
        }
    if key == "W5":
        peers = [
            (float(e["median_s"]), name)
            for name, e in wl.get("tools", {}).items()
            if name != "fetchpool" and e.get("median_s") is not None
        ]
        if not peers:
            return {"target": TARGETS[key], "status": "n/a", "why": "no peer measured"}
        best, peer = min(peers)
        entry = wl["tools"]["fetchpool"]
        lost, partial = int(entry.get("lost", 0)), int(entry.get("partial", 0))
        ratio = fp / best
        return {
            "target": TARGETS[key],
            "status": "PASS"
            if ratio <= TARGET_LIMITS[key][1] and not (lost or partial)
            else "MISS",
            "value": f"{ratio:.2f} x {peer}, {lost} lost, {partial} partial",
        }
    return {"target": TARGETS[key], "status": "n/a", "why": "no target for this workload"}


def _sorted_tools(wl: dict) -> list[tuple[str, dict]]:
    tools = list(wl.get("tools", {}).items())
    return sorted(tools, key=lambda kv: (kv[1].get("median_s") is None, kv[1].get("median_s") or 0))


def table(wl: dict) -> str:
    fp = _median(wl, "fetchpool")
    rows = [
        "| tool | median s | min s | max s | x fetchpool | CPU s | peak RSS MB (tree / largest) "
        "| TCP conns | other CPU s | runs ok |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, entry in _sorted_tools(wl):
        label = f"**{name}**" if name == "fetchpool" else name
        if "skipped" in entry:
            rows.append(f"| {label} | skipped: {entry['skipped']} | | | | | | | | |")
            continue
        med = entry.get("median_s")
        if med is None:
            err = html.escape(str(entry.get("error", "failed")).replace("\n", " "))[-220:]
            err = err.replace("|", "\\|")
            rows.append(f"| {label} | FAILED: `{err}` | | | | | | | | 0/{entry.get('runs', 0)} |")
            continue
        ratio = f"{med / fp:.2f}" if fp else "—"
        rows.append(
            f"| {label} | {med:.2f} | {entry['min_s']:.2f} | {entry['max_s']:.2f} | {ratio} "
            f"| {entry['cpu_s']:.1f} | {entry['tree_rss_mb']:.0f} / {entry['maxrss_mb']:.0f} "
            f"| {entry.get('connections', '—')} | {entry.get('other_cpu_s', '—')} "
            f"| {entry['runs_ok']}/{entry['runs']} |"
        )
    return "\n".join(rows)


def web_table(wl: dict) -> str:
    """W5: time and what each tool left behind (worst of its runs)."""
    fp = _median(wl, "fetchpool")
    rows = [
        "| tool | median s | min s | max s | x fetchpool | photos intact | lost | partial files "
        "left | failures it reported | exit | CPU s | peak RSS MB (tree / largest) | TCP conns "
        "| other CPU s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | ---: |",
    ]
    for name, entry in _sorted_tools(wl):
        label = f"**{name}**" if name == "fetchpool" else name
        med = entry.get("median_s")
        if med is None:
            why = entry.get("skipped") or entry.get("error", "failed")
            rows.append(f"| {label} | {html.escape(str(why))[:200]} |" + " |" * 13)
            continue
        reported = sorted({r for r in entry.get("reported", []) if r is not None})
        rows.append(
            f"| {label} | {med:.2f} | {entry['min_s']:.2f} | {entry['max_s']:.2f} "
            f"| {med / fp:.2f} | {entry['intact']} | {entry['lost']} | {entry['partial']} "
            f"| {'/'.join(map(str, reported)) or '—'} "
            f"| {'/'.join(map(str, entry.get('exit_codes', [])))} | {entry['cpu_s']:.1f} "
            f"| {entry['tree_rss_mb']:.0f} / {entry['maxrss_mb']:.0f} "
            f"| {entry.get('connections', '—')} | {entry.get('other_cpu_s', '—')} |"
        )
    return "\n".join(rows)


def workload_section(key: str, wl: dict, svg_rel: str = "../benchmarks/results") -> list[str]:
    """The heading, the line of parameters, the chart and the table of one workload."""
    if key == "W5":
        site = wl.get("site") or {}
        params = (
            f"N = {wl['n']} URLs on {site.get('hosts')} hosts ({site.get('https_hosts')} HTTPS), "
            f"{site.get('good')} of them should be saved; outcomes {site.get('kinds')}; latency "
            f"ms {site.get('latency_ms')}; busiest hosts (% of URLs) {site.get('top_hosts_pct')}; "
            f"concurrency {wl['concurrency']}, {wl.get('per_host')} per host; lower bound "
            f"{wl['floor_s']:.2f} s; medians of {wl['repeat']} round-robin runs ({wl['finished']})."
        )
        body = web_table(wl)
    else:
        params = (
            f"N = {wl['n']}, latency {wl['latency_ms']} ms, concurrency {wl['concurrency']}, "
            f"floor N·L/C = {wl['floor_s']:.2f} s; medians of {wl['repeat']} round-robin runs "
            f"({wl['finished']})."
        )
        body = table(wl)
    return [
        "",
        f"### {key} — {wl['title']}",
        "",
        params,
        "",
        f"![{key} chart]({svg_rel}/{key}.svg)",
        "",
        body,
    ]


def svg_chart(wl: dict) -> str:
    """Horizontal bars of the median (whisker: min-max), fetchpool highlighted, floor dashed."""
    bars = [(n, e) for n, e in _sorted_tools(wl) if e.get("median_s") is not None]
    width, left, right, row, top = 760, 170, 90, 26, 34
    height = top + row * max(1, len(bars)) + 30
    floor = float(wl.get("floor_s") or 0)
    vmax = max([float(e["max_s"]) for _, e in bars] + [floor, 1e-9])
    scale = (width - left - right) / vmax

    def x(v: float) -> float:
        return left + v * scale

    title = html.escape(f"{wl['key']}: {wl['title']} — wall time, seconds (lower is better)")
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="10" y="20" font-size="13" font-weight="bold">{title}</text>',
    ]
    for i, (name, e) in enumerate(bars):
        y = top + i * row
        color = "#d9480f" if name == "fetchpool" else "#4c6ef5"
        med, lo, hi = float(e["median_s"]), float(e["min_s"]), float(e["max_s"])
        out += [
            f'<text x="{left - 8}" y="{y + 15}" text-anchor="end">{html.escape(name)}</text>',
            f'<rect x="{left}" y="{y + 4}" width="{max(1.0, med * scale):.1f}" height="16" '
            f'fill="{color}"/>',
            f'<line x1="{x(lo):.1f}" y1="{y + 12}" x2="{x(hi):.1f}" y2="{y + 12}" '
            f'stroke="black" stroke-width="1"/>',
            f'<text x="{x(hi) + 6:.1f}" y="{y + 16}">{med:.2f} s</text>',
        ]
    if floor > 0:
        fx = x(floor)
        out += [
            f'<line x1="{fx:.1f}" y1="{top}" x2="{fx:.1f}" y2="{height - 24}" stroke="#2b8a3e" '
            f'stroke-dasharray="4 3"/>',
            f'<text x="{fx:.1f}" y="{height - 10}" fill="#2b8a3e" text-anchor="middle">'
            f"floor N·L/C = {floor:.2f} s</text>",
        ]
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _machine(results: dict) -> str:
    m = results.get("machine", {})
    v = m.get("versions", {})
    o = results.get("outputs", {})
    lines = [
        f"- machine: {m.get('nproc')} cores ({m.get('cpu_model')}), {m.get('mem_gib')} GiB, "
        f"{m.get('os')}, kernel {m.get('kernel')}",
        f"- Python {m.get('python')}; fetchpool {v.get('fetchpool')} "
        f"(commit {m.get('fetchpool_commit')})",
        f"- origin: {results.get('origin')}; corpus: {results.get('corpus_note')}",
        f"- outputs written to {o.get('fstype')} ({o.get('root')}: {o.get('create_per_s')} "
        f"file creates/s by one thread; this machine's disk: {o.get('disk_create_per_s')}/s)",
        "- tools: " + "; ".join(f"{k}: {val}" for k, val in v.items() if k != "fetchpool"),
        f"- generated {results.get('generated')} by `{results.get('command')}`",
    ]
    return "\n".join(lines)


def render_results(results: dict, svg_rel: str = "../benchmarks/results") -> str:
    parts = [
        _machine(results),
        "",
        "### Targets",
        "",
        "| workload | target | measured | status |",
        "| --- | --- | --- | --- |",
    ]
    workloads = results.get("workloads", {})
    for key in ("W1", "W2", "W3", "W4", "W5", "W6", "startup"):
        if key in workloads:
            t = evaluate_target(key, workloads[key])
            parts.append(
                f"| {key} | {t['target']} | {t.get('value', t.get('why', ''))} "
                f"| **{t['status']}** |"
            )
    for key in ("W1", "W2", "W3", "W4", "W5", "W6"):
        wl = workloads.get(key)
        if wl:
            parts += workload_section(key, wl, svg_rel)
    st = workloads.get("startup")
    if st and st.get("median_s") is not None:
        parts += [
            "",
            "### Start-up",
            "",
            f"`fetchpool --help`: median {st['median_s']:.3f} s (min {st['min_s']:.3f}, "
            f"max {st['max_s']:.3f}) over {st['runs']} runs, peak RSS {st['maxrss_mb']:.0f} MB.",
        ]
    parts += ["", "<details><summary>Exact commands</summary>", ""]
    for key in ("W1", "W2", "W3", "W4", "W5", "W6"):
        for name, entry in workloads.get(key, {}).get("tools", {}).items():
            parts.append(f"- {key} {name}: `{entry['cmd']}`")
    parts += ["", "</details>"]
    return "\n".join(parts)


def write_outputs(results: dict, write_doc: bool) -> None:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    for key, wl in results.get("workloads", {}).items():
        if key != "startup" and wl.get("tools"):
            (RESULTS_DIR / f"{key}.svg").write_text(svg_chart(wl))
    if not write_doc:
        return
    block = f"{START}\n{render_results(results)}\n{END}"
    text = DOC.read_text() if DOC.exists() else f"# Benchmarks\n\n{START}\n{END}\n"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text += "\n" + block + "\n"
    DOC.write_text(text)
