"""``python -m loadtest``: run scenarios against edgeterm and the anchors, interleaved, in rounds.

    python -m loadtest [SCENARIO ...] [--targets edgeterm,haproxy,nginx] [--rounds N]
                       [--duration S] [--key-type ecdsa-p256|rsa-2048] [--tls 1.3|1.2]
                       [--charts DIR | --no-charts] [--smoke] [--from-results FILE]

SCENARIO: full, resumed, keepalive, bulk, paced, idle, reload, kill, or all (the default).
Within a round each scenario runs against each target in turn (edgeterm, haproxy, nginx,
edgeterm, ...), each time on a freshly started target. Raw results go to
loadtest/results/<stamp>.jsonl, the Markdown report to <stamp>.md (and stdout).

Exit codes: 0 done (smoke: no regression); 1 smoke regression or a run failed;
2 usage; 3 a prerequisite is missing (the message names the apt package).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loadtest import prereq, report, source, targets
from loadtest.clients import build
from loadtest.errors import LoadtestError, MissingPrerequisite
from loadtest.scenarios import (
    AT_HALF_LOAD,
    DISRUPTIONS,
    RUNNERS,
    SCENARIOS,
    Bench,
    calibrate_half_load,
)
from loadtest.upstream import Upstream

RESULTS = Path(__file__).resolve().parent / "results"
SMOKE_SCENARIOS = ("full", "keepalive", "bulk")
SMOKE_TARGETS = "edgeterm,haproxy"
SMOKE_MAX_FULL_RATIO = 1.5
EXIT_REGRESSION = 1
EXIT_MISSING = 3


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m loadtest",
        description="edgeterm against haproxy and nginx: CPU per unit of work, latency, memory.",
    )
    p.add_argument(
        "scenarios", nargs="*", help="full resumed keepalive bulk paced idle reload kill | all"
    )
    p.add_argument("--targets", default=None, help="comma-separated (default: all three)")
    p.add_argument("--rounds", type=int, default=None, help="rounds (default 3; smoke 1)")
    p.add_argument("--duration", type=float, default=None, help="seconds per throughput run")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up per run")
    p.add_argument("--key-type", choices=("ecdsa-p256", "rsa-2048"), default="ecdsa-p256")
    p.add_argument("--tls", choices=("1.3", "1.2"), default="1.3", help="what the client offers")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--idle-conns", type=int, default=0, help="default: the fd limit's worth")
    p.add_argument("--half-load", type=float, default=0.0, help="conn/s for reload/kill")
    p.add_argument("--charts", type=Path, default=None, help="directory for the PNG charts")
    p.add_argument("--no-charts", action="store_true")
    p.add_argument("--results", type=Path, default=RESULTS, help="directory for raw results")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="CI: full, keepalive, bulk against haproxy; fail on a gross regression",
    )
    p.add_argument(
        "--edgeterm-src",
        default=source.WORKTREE,
        metavar="REF",
        help="measure edgeterm at git REF (a frozen snapshot) instead of the live work tree",
    )
    p.add_argument(
        "--from-results",
        type=Path,
        nargs="+",
        default=None,
        metavar="JSONL",
        help="report (and chart) these raw results together instead of running anything",
    )
    args = p.parse_args(argv)
    if args.smoke:
        args.scenarios = args.scenarios or list(SMOKE_SCENARIOS)
        args.targets = args.targets or SMOKE_TARGETS
        # two rounds: the verdict needs every round over the limit (this VM moves one
        # target's CPU per handshake by up to 30% between rounds)
        args.rounds = args.rounds or 2
        args.duration = args.duration or 5.0
        args.no_charts = args.no_charts or args.charts is None
    args.targets = (args.targets or ",".join(targets.TARGETS)).split(",")
    args.rounds = args.rounds or 3
    args.duration = args.duration or 6.0
    if not args.scenarios or "all" in args.scenarios:
        args.scenarios = list(SCENARIOS)
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    return args


class Progress:
    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def __call__(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {text}", file=sys.stderr, flush=True)


def describe(scenario: str, rec: dict[str, Any]) -> str:
    if rec.get("failed"):
        return f"FAILED: {rec['failed']}"
    if scenario == "idle":
        kib = rec.get("kib_per_conn")
        return (
            f"{rec['units']:,} connections held, "
            f"{'-' if kib is None else f'{kib:.1f}'} KiB PSS each, errors {rec['errors']}"
        )
    if scenario in DISRUPTIONS:
        per = rec.get("failed_per_10k")
        return (
            f"{rec['units']:,} connections at {rec['offered_rate']:.0f}/s, "
            f"{rec['failures']} failed ({'-' if per is None else f'{per:.1f}'} per 10,000) "
            f"{rec['error_kinds'] or ''} {rec.get('action_errors') or ''}".rstrip()
        )
    scale, unit = report.CPU_UNITS[scenario]
    cpu = rec.get("cpu_per_unit_us")
    extra = ""
    if rec.get("unit") == "handshake":
        extra = f", resumed {rec['client_resumed']}/{rec['handshakes']}"
        if "server_resumed" in rec:
            extra += f" (server: {rec['server_resumed']}/{rec['server_handshakes']})"
    return (
        f"{rec['rate']:,.0f} {rec['unit']}s/s, p50 {rec['p50_ms']} ms, p99 {rec['p99_ms']} ms, "
        f"CPU {'-' if cpu is None else report.fmt_num(cpu * scale)} {unit}, "
        f"errors {rec['errors']}{extra}"
    )


def run_one(bench: Bench, scenario: str, name: str, round_no: int) -> dict[str, Any]:
    target = targets.TARGETS[name](bench.setup_for(name))
    rec: dict[str, Any] = {"type": "run", "scenario": scenario, "target": name, "round": round_no}
    rec["time"] = datetime.now(UTC).isoformat(timespec="seconds")
    rec["loadavg_1min"] = round(os.getloadavg()[0], 2)  # others' work on the same CPUs
    try:
        target.start()
        rec.update(RUNNERS[scenario](bench, SCENARIOS[scenario], target))
        if target.proc is not None and target.proc.poll() is not None:
            rec["target_exited"] = target.proc.returncode
    except (LoadtestError, TimeoutError, OSError) as exc:
        rec["failed"] = str(exc)
    finally:
        # the logs are read before the stop: what a target logs about being stopped is no news
        problems = target.problem_lines()
        target.stop()
    if problems:
        rec["server_log_problems"] = problems[:20]
    if bench.keep_logs is not None and (rec.get("failed") or rec.get("errors") or problems):
        kept = bench.keep_logs / target.setup.run_dir.name
        target.keep_logs(kept)
        rec["logs"] = str(kept)
    return rec


def run(args: argparse.Namespace, progress: Progress) -> tuple[list[dict[str, Any]], Path]:
    targets.check_available(args.targets)
    binaries = build.build_all()
    args.results.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    raw_path = args.results / f"{stamp}.jsonl"
    root = Path(tempfile.mkdtemp(prefix="loadtest-"))
    try:
        src = source.snapshot(args.edgeterm_src, root / "src")
    except LoadtestError:
        shutil.rmtree(root, ignore_errors=True)
        raise
    from edgeterm.selfsigned import generate

    cert = generate(root / "certs", ["localhost"], key_type=args.key_type)
    combined = root / "certs" / "combined.pem"
    combined.write_bytes(cert.cert_path.read_bytes() + cert.key_path.read_bytes())
    upstream = Upstream(binaries["upstream"])
    records: list[dict[str, Any]] = []
    meta: dict[str, Any] = {
        "type": "meta",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python -m loadtest " + " ".join(sys.argv[1:]),
        "rounds": args.rounds,
        "duration": args.duration,
        "key_type": args.key_type,
        "tls": args.tls,
        "workers": args.workers,
        "scenarios": args.scenarios,
        "targets": args.targets,
        "machine": prereq.machine(),
        "tree": prereq.source_tree(),
        "edgeterm_src": src.label,
        "loadavg_start": os.getloadavg(),
    }
    try:
        upstream.start()
        bench = Bench(
            tlsload=binaries["tlsload"],
            upstream=upstream,
            root=root,
            cert=cert.cert_path,
            key=cert.key_path,
            combined=combined,
            duration=args.duration,
            warmup=args.warmup,
            workers=args.workers,
            tls12=args.tls == "1.2",
            idle_conns=args.idle_conns,
            half_load=args.half_load,
            edgeterm_path=src.pythonpath,
        )
        bench.keep_logs = args.results / f"{stamp}-logs"
        progress(f"raw results: {raw_path}")
        with open(raw_path, "w") as out:
            out.write(json.dumps(meta) + "\n")
            for round_no in range(1, args.rounds + 1):
                for scenario in args.scenarios:
                    for name in args.targets:
                        cls = targets.TARGETS[name]
                        if (scenario == "reload" and not cls.can_reload) or (
                            scenario == "kill" and not cls.can_kill_worker
                        ):
                            continue
                        if scenario in AT_HALF_LOAD and bench.half_load <= 0:
                            bench.half_load = _half_load(bench, records, args.targets, progress)
                        rec = run_one(bench, scenario, name, round_no)
                        records.append(rec)
                        out.write(json.dumps(rec) + "\n")
                        out.flush()
                        progress(
                            f"round {round_no}/{args.rounds} {scenario:9} {name:8} "
                            + describe(scenario, rec)
                        )
                        shown = [] if scenario == "kill" else rec.get("server_log_problems", [])
                        for line in shown[:3]:
                            progress(f"    {name} log: {line}")
            end = {"type": "end", "loadavg_end": os.getloadavg()}
            out.write(json.dumps(end) + "\n")
    finally:
        upstream.stop()
        shutil.rmtree(root, ignore_errors=True)
    return [meta, *records, end], raw_path


def _half_load(
    bench: Bench, records: list[dict[str, Any]], names: list[str], progress: Progress
) -> float:
    """Half of edgeterm's full-handshake rate: from this invocation's runs, else measured."""
    rates = [
        r["rate"]
        for r in records
        if r["scenario"] == "full" and r["target"] == "edgeterm" and not r.get("failed")
    ]
    if rates:
        half = float(sorted(rates)[len(rates) // 2]) / 2.0
        progress(f"half load: {half:.0f} connections/s (half of edgeterm's full-handshake rate)")
        return half
    name = "edgeterm" if "edgeterm" in names else names[0]
    target = targets.TARGETS[name](bench.setup_for(name))
    target.start()
    try:
        half = calibrate_half_load(bench, target)
    finally:
        target.stop()
    progress(f"half load: {half:.0f} connections/s (calibrated on {name})")
    return half


def _per_round_ratios(records: list[dict[str, Any]], scenario: str) -> list[float]:
    """edgeterm's CPU per unit of work over haproxy's, for each round that measured both."""
    cpu: dict[int, dict[str, float]] = {}
    for rec in records:
        value = rec.get("cpu_per_unit_us")
        if rec.get("scenario") == scenario and value:
            cpu.setdefault(int(rec["round"]), {})[str(rec["target"])] = float(value)
    return [
        by["edgeterm"] / by["haproxy"]
        for _round, by in sorted(cpu.items())
        if "edgeterm" in by and "haproxy" in by
    ]


def smoke_verdict(records: list[dict[str, Any]], progress: Progress) -> int:
    cs = report.cells(records)
    bad: list[str] = []
    for rec in records:
        if rec.get("failed"):
            bad.append(f"{rec['scenario']}/{rec['target']} failed: {rec['failed']}")
        elif rec.get("errors"):
            bad.append(
                f"{rec['scenario']}/{rec['target']}: {rec['errors']} client errors "
                f"{rec['error_kinds']}"
            )
    for scenario in SMOKE_SCENARIOS:
        et, hp = cs.get((scenario, "edgeterm")), cs.get((scenario, "haproxy"))
        r = report.ratio(et.cpu if et else None, hp.cpu if hp else None)
        unit = report.CPU_UNITS[scenario][1]
        if r is None:
            bad.append(f"{scenario}: no CPU ratio (a run is missing)")
            continue
        assert et is not None and hp is not None and et.cpu is not None and hp.cpu is not None
        progress(
            f"smoke {scenario:9} CPU edgeterm {report.fmt_num(et.cpu.median)} {unit} / haproxy "
            f"{report.fmt_num(hp.cpu.median)} {unit} = {r:.2f}"
        )
        if scenario == "full":
            per_round = _per_round_ratios(records, scenario)
            progress(
                "smoke full      per-round ratios "
                + ", ".join(f"{x:.2f}" for x in per_round)
                + f" (a regression: every round above {SMOKE_MAX_FULL_RATIO}x)"
            )
            if per_round and min(per_round) > SMOKE_MAX_FULL_RATIO:
                bad.append(
                    f"CPU per full handshake is {min(per_round):.2f}x haproxy's or more in every "
                    f"round (limit {SMOKE_MAX_FULL_RATIO}x)"
                )
    for line in bad:
        progress(f"smoke FAIL: {line}")
    if not bad:
        progress("smoke ok: no gross regression against haproxy")
    return EXIT_REGRESSION if bad else 0


def merge_results(paths: list[Path]) -> list[dict[str, Any]]:
    """The lines of several raw result files, as one invocation: the first file's meta (its
    command and date list every file's), every file's runs, the last file's end."""
    metas: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    end: dict[str, Any] = {}
    for path in paths:
        for text in path.read_text().splitlines():
            if not text.strip():
                continue
            line = json.loads(text)
            if line.get("type") == "meta":
                metas.append(line)
            elif line.get("type") == "end":
                end = line
            else:
                runs.append(line)
    meta: dict[str, Any] = dict(metas[0]) if metas else {"type": "meta"}
    if len(metas) > 1:
        meta["command"] = " ; ".join(str(m.get("command")) for m in metas)
        meta["date"] = ", ".join(str(m.get("date")) for m in metas)
        meta["rounds"] = sum(int(m.get("rounds") or 0) for m in metas)
        srcs = {str(m.get("edgeterm_src")) for m in metas}
        meta["edgeterm_src"] = srcs.pop() if len(srcs) == 1 else "several sources"
    return [meta, *runs, *([end] if end else [])]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    progress = Progress()
    if args.from_results is not None:
        lines = merge_results(args.from_results)
        raw_path = args.from_results[0]
        if len(args.from_results) > 1:
            raw_path = raw_path.with_name(raw_path.stem + f"+{len(args.from_results) - 1}.jsonl")
    else:
        try:
            lines, raw_path = run(args, progress)
        except MissingPrerequisite as exc:
            print(f"loadtest: {exc}", file=sys.stderr)
            return EXIT_MISSING
        except LoadtestError as exc:
            print(f"loadtest: {exc}", file=sys.stderr)
            return EXIT_REGRESSION
        except KeyboardInterrupt:
            print("loadtest: interrupted", file=sys.stderr)
            return 130
    meta: dict[str, Any] = {}
    for line in lines:
        if line.get("type") in ("meta", "end"):
            meta.update(line)
    records = [x for x in lines if x.get("type") == "run"]
    text = report.markdown(records, meta)
    md_path = raw_path.with_suffix(".md")
    md_path.write_text(text + "\n")
    print(text)
    progress(f"report: {md_path}")
    if not args.no_charts:
        from loadtest import charts

        directory = args.charts or raw_path.parent / f"{raw_path.stem}-charts"
        for path in charts.write(records, directory):
            progress(f"chart: {path}")
    if args.smoke:
        return smoke_verdict(records, progress)
    return 1 if any(r.get("failed") for r in records) else 0
