"""From raw results (one dict per run) to medians with min and max, ratios and Markdown."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

TARGET_ORDER = ("edgeterm", "haproxy", "nginx")
SCENARIO_ORDER = ("full", "resumed", "keepalive", "bulk", "paced", "idle", "reload", "kill")
# How each scenario's CPU per unit is shown: (scale from µs, unit label).
CPU_UNITS: dict[str, tuple[float, str]] = {
    "full": (1.0, "µs/handshake"),
    "resumed": (1.0, "µs/handshake"),
    "keepalive": (1.0, "µs/request"),
    "bulk": (1000.0, "ns/byte"),
    "paced": (1.0, "µs/handshake"),
}


@dataclass(frozen=True, slots=True)
class Spread:
    median: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: Iterable[float | None]) -> Spread | None:
        vals = [float(v) for v in values if v is not None]
        if not vals:
            return None
        return cls(statistics.median(vals), min(vals), max(vals), len(vals))

    def scaled(self, k: float) -> Spread:
        return Spread(self.median * k, self.low * k, self.high * k, self.n)


@dataclass(slots=True)
class Cell:
    """Everything measured for one scenario and one target, over the rounds."""

    scenario: str
    target: str
    runs: list[dict[str, Any]] = field(default_factory=list)

    def spread(self, key: str) -> Spread | None:
        return Spread.of(r.get(key) for r in self.runs)

    def total(self, key: str) -> int:
        return sum(int(r.get(key) or 0) for r in self.runs)

    @property
    def cpu(self) -> Spread | None:
        """CPU per unit in the scenario's display unit (µs, or ns per byte)."""
        s = self.spread("cpu_per_unit_us")
        scale = CPU_UNITS.get(self.scenario, (1.0, ""))[0]
        return s.scaled(scale) if s is not None else None

    @property
    def failed_per_10k(self) -> float | None:
        attempts = self.total("units")
        return self.total("failures") / attempts * 10_000 if attempts else None

    def error_kinds(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.runs:
            for kind, n in (r.get("error_kinds") or {}).items():
                out[kind] = out.get(kind, 0) + int(n)
        return out

    def resumed_share(self) -> float | None:
        hs = self.total("handshakes")
        return self.total("client_resumed") / hs if hs else None


def cells(records: Iterable[dict[str, Any]]) -> dict[tuple[str, str], Cell]:
    out: dict[tuple[str, str], Cell] = {}
    for r in records:
        if r.get("failed"):
            continue
        key = (r["scenario"], r["target"])
        out.setdefault(key, Cell(*key)).runs.append(r)
    return out


def _ordered(keys: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    def rank(k: tuple[str, str]) -> tuple[int, int]:
        s, t = k
        return (
            SCENARIO_ORDER.index(s) if s in SCENARIO_ORDER else 99,
            TARGET_ORDER.index(t) if t in TARGET_ORDER else 99,
        )

    return sorted(keys, key=rank)


def fmt_num(v: float | None) -> str:
    if v is None:
        return "-"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def fmt_spread(s: Spread | None) -> str:
    if s is None:
        return "-"
    if s.n == 1:
        return fmt_num(s.median)
    return f"{fmt_num(s.median)} ({fmt_num(s.low)}-{fmt_num(s.high)})"


def ratio(a: Spread | None, b: Spread | None) -> float | None:
    if a is None or b is None or b.median == 0:
        return None
    return a.median / b.median


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def throughput_table(cs: dict[tuple[str, str], Cell]) -> list[str]:
    rows = []
    for key in _ordered(cs):
        scenario, target = key
        if scenario not in CPU_UNITS:
            continue
        c = cs[key]
        base = cs.get((scenario, "edgeterm"))
        rel = ratio(base.cpu, c.cpu) if base is not None and target != "edgeterm" else None
        share = c.resumed_share() if CPU_UNITS[scenario][1] == "µs/handshake" else None
        rows.append(
            [
                f"{scenario} ({CPU_UNITS[scenario][1]})",
                target,
                fmt_spread(c.cpu),
                "-" if rel is None else f"{rel:.2f}",
                fmt_spread(c.spread("rate")),
                fmt_spread(c.spread("p50_ms")),
                fmt_spread(c.spread("p99_ms")),
                str(c.total("errors")),
                "-" if share is None else f"{share:.1%}",
            ]
        )
    header = [
        "scenario (CPU unit)",
        "target",
        "CPU per unit",
        "edgeterm ÷ this",
        "rate /s",
        "p50 ms",
        "p99 ms",
        "errors",
        "resumed",
    ]
    return _table(header, rows) if rows else []


def idle_table(cs: dict[tuple[str, str], Cell]) -> list[str]:
    rows = []
    for key in _ordered(cs):
        if key[0] != "idle":
            continue
        c = cs[key]
        rows.append(
            [
                key[1],
                fmt_spread(c.spread("units")),
                fmt_spread(c.spread("kib_per_conn")),
                fmt_spread(c.spread("setup_cpu_per_conn_us")),
                str(c.total("errors") + c.total("setup_failed")),
            ]
        )
    header = ["target", "connections held", "KiB PSS per connection", "setup µs CPU/conn", "errors"]
    return _table(header, rows) if rows else []


def disruption_table(cs: dict[tuple[str, str], Cell]) -> list[str]:
    rows = []
    for key in _ordered(cs):
        if key[0] not in ("reload", "kill"):
            continue
        c = cs[key]
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(c.error_kinds().items())) or "-"
        rows.append(
            [
                key[0],
                key[1],
                fmt_spread(c.spread("offered_rate")),
                f"{c.total('units'):,}",
                str(c.total("failures")),
                fmt_num(c.failed_per_10k),
                kinds,
            ]
        )
    header = [
        "scenario",
        "target",
        "offered conn/s",
        "connections",
        "failed",
        "failed per 10,000",
        "failures by kind",
    ]
    return _table(header, rows) if rows else []


@dataclass(frozen=True, slots=True)
class Check:
    figure: str
    goal: str
    edgeterm: str
    anchor: str
    ratio: float | None
    met: bool | None  # None: not measured


def _best(cs: dict[tuple[str, str], Cell], scenario: str) -> tuple[str, Spread] | None:
    found = [(t, cs[(scenario, t)].cpu) for t in ("haproxy", "nginx") if (scenario, t) in cs]
    found2 = [(t, s) for t, s in found if s is not None]
    return min(found2, key=lambda p: p[1].median) if found2 else None


def checks(cs: dict[tuple[str, str], Cell]) -> list[Check]:
    out: list[Check] = []

    def cpu_check(figure: str, scenario: str, bound: float, anchor: str | None) -> None:
        et = cs.get((scenario, "edgeterm"))
        unit = CPU_UNITS[scenario][1]
        goal = f"≤ {bound:.2f} x " + (
            "the better of haproxy and nginx" if anchor is None else anchor
        )
        pick = (
            _best(cs, scenario)
            if anchor is None
            else ((anchor, cs[(scenario, anchor)].cpu) if (scenario, anchor) in cs else None)
        )
        if et is None or et.cpu is None or pick is None or pick[1] is None:
            out.append(Check(figure, goal, "-", "-", None, None))
            return
        r = et.cpu.median / pick[1].median
        out.append(
            Check(
                figure,
                goal,
                f"{fmt_num(et.cpu.median)} {unit}",
                f"{pick[0]} {fmt_num(pick[1].median)} {unit}",
                r,
                r <= bound,
            )
        )

    cpu_check("CPU per full handshake", "full", 0.95, None)
    cpu_check("CPU per resumed handshake", "resumed", 0.95, None)
    cpu_check("CPU per keep-alive request", "keepalive", 1.0, "haproxy")
    cpu_check("CPU per byte, bulk", "bulk", 0.90, "haproxy")

    idle = cs.get(("idle", "edgeterm"))
    mem = idle.spread("kib_per_conn") if idle is not None else None
    anchors = [
        f"{t} {fmt_num(s.median)} KiB"
        for t in ("haproxy", "nginx")
        if (c := cs.get(("idle", t))) is not None and (s := c.spread("kib_per_conn")) is not None
    ]
    out.append(
        Check(
            "memory per idle TLS connection (PSS)",
            "≤ 12 KiB",
            "-" if mem is None else f"{fmt_num(mem.median)} KiB",
            ", ".join(anchors) or "-",
            None if mem is None else mem.median / 12.0,
            None if mem is None else mem.median <= 12.0,
        )
    )

    # p99 at the same offered rate (paced) when measured: at saturation it only restates
    # the throughput (Little's law with a fixed number of clients).
    lat = "paced" if ("paced", "edgeterm") in cs else "full"
    et_full, ng_full = cs.get((lat, "edgeterm")), cs.get((lat, "nginx"))
    p_et = et_full.spread("p99_ms") if et_full is not None else None
    p_ng = ng_full.spread("p99_ms") if ng_full is not None else None
    r = ratio(p_et, p_ng)
    out.append(
        Check(
            f"full-handshake p99 latency ({lat})",
            "≤ nginx's",
            "-" if p_et is None else f"{fmt_num(p_et.median)} ms",
            "-" if p_ng is None else f"nginx {fmt_num(p_ng.median)} ms",
            r,
            None if r is None else r <= 1.0,
        )
    )

    for scenario in ("reload", "kill"):
        c = cs.get((scenario, "edgeterm"))
        rate = c.failed_per_10k if c is not None else None
        anchors = [
            f"{t} {fmt_num(a.failed_per_10k)}"
            for t in ("haproxy", "nginx")
            if (a := cs.get((scenario, t))) is not None
        ]
        out.append(
            Check(
                f"failed connections per 10,000, {scenario} at half load",
                "0",
                "-" if rate is None else fmt_num(rate),
                ", ".join(anchors) or "-",
                None,
                None if rate is None else rate == 0,
            )
        )
    return out


def checks_table(cs: dict[tuple[str, str], Cell]) -> list[str]:
    rows = []
    for ch in checks(cs):
        if ch.met is None and ch.ratio is None:
            continue  # not measured in this invocation
        met = {True: "yes", False: "**no**", None: "not measured"}[ch.met]
        rows.append(
            [
                ch.figure,
                ch.goal,
                ch.edgeterm,
                ch.anchor,
                "-" if ch.ratio is None else f"{ch.ratio:.2f}",
                met,
            ]
        )
    return _table(["figure", "target", "edgeterm", "anchor", "ratio", "met"], rows)


def _measured(meta: dict[str, Any]) -> str:
    src = meta.get("edgeterm_src")
    if src and src != "worktree":
        return f"commit {src} (a frozen snapshot)"
    tree = meta.get("tree")
    if not isinstance(tree, dict):
        return "-"
    changed = tree.get("changed") or []
    edits = f" + {len(changed)} files changed in the work tree" if changed else ""
    return f"the work tree at commit {tree.get('head')}{edits}"


def _loadavg(v: Any) -> str:
    return "-" if not v else " / ".join(f"{x:.2f}" for x in v)


def markdown(records: Sequence[dict[str, Any]], meta: dict[str, Any]) -> str:
    cs = cells(records)
    lines = [
        f"## loadtest results, {meta.get('date', '')}",
        "",
        f"Command: `{meta.get('command', '')}`  ",
        f"Rounds: {meta.get('rounds')}, {meta.get('duration')} s per throughput run, "
        f"key {meta.get('key_type')}, client TLS {meta.get('tls')}, "
        f"{meta.get('workers')} workers. Medians with (min-max) over rounds.  ",
        f"edgeterm measured: {_measured(meta)}.  ",
        f"Load average (1, 5, 15 min) at start {_loadavg(meta.get('loadavg_start'))}, "
        f"at end {_loadavg(meta.get('loadavg_end'))}.",
        "",
    ]
    for title, table in (
        ("Throughput scenarios (terminator CPU per unit of work)", throughput_table(cs)),
        ("Idle connections (PSS of all the terminator's processes)", idle_table(cs)),
        ("Reload and worker kill under half load", disruption_table(cs)),
        (
            "Against the targets of issue 5",
            checks_table(cs) if any(k[1] == "edgeterm" for k in cs) else [],
        ),
    ):
        if table:
            lines += [f"### {title}", "", *table, ""]
    failed = [r for r in records if r.get("failed")]
    if failed:
        lines += ["### Runs that failed", ""]
        lines += [
            f"- {r['scenario']} / {r['target']} round {r['round']}: {r['failed']}" for r in failed
        ]
        lines.append("")
    return "\n".join(lines)
