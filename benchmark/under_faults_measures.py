"""What `benchmark/under_faults.py` reports, computed from a run's records: no server here, so it is unit-tested
(tests/unit/test_under_faults.py). Percentiles, goodput under an SLO, recovery latency per fault, the phases a request
falls in (before the first fault, a recovery window, after), the ratios with their targets, the markdown table and
the throughput plot.

A run is a dict: `t0` and `ended` (time.monotonic), `records` (`RequestRecord`s of an `OpenLoad`), `replay` (the
records of `benchmark/replay.py`, `at` on the same clock) and `probes` ((sent, succeeded) of the fault probes).
"""

from __future__ import annotations

import math

from sglang_ft.tools.load import RequestRecord, rate_series

FAULTS = ("kill", "hang")


def delivered(record: dict) -> bool:
    """A fault counts only when its signal reached a process: one skipped (the worker had no process, as when it
    was already dead, or the replay was stopped) or failed to send tests no recovery."""
    return record["event"] in FAULTS and record["outcome"] == "sent"
SYSTEMS = {"ft": "sglang-ft", "rr": "restart-and-reload", "none": "no recovery"}
TARGETS = {"throughput": 2.5, "recovery": 100.0, "ft_lost": 0}


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear between closest ranks (numpy's default); None for no values."""
    xs = sorted(values)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def recovery_latencies(fault_times: list[float], successes: list[tuple[float, float]]) -> list[float | None]:
    """Per fault: seconds from it until the first success of a request sent at or after it, from (sent,
    succeeded) pairs; None when none succeeded."""
    out = []
    for f in fault_times:
        after = [ok for sent, ok in successes if sent >= f]
        out.append(min(after) - f if after else None)
    return out


def phase_of(r: RequestRecord, first_fault: float | None, windows: list[tuple[float, float]], end: float) -> str:
    """'recovery' if the request's life (arrival to completion, or to `end`) overlaps a recovery window, else
    'before' (completed before the first fault) or 'after'."""
    last = r.done if r.done is not None else end
    if any(r.arrival <= b and last >= a for a, b in windows):
        return "recovery"
    return "before" if first_fault is None or last < first_fault else "after"


def _r(v: float | None, digits: int = 3) -> float | None:
    return None if v is None else round(v, digits)


def latency_stats(records: list[RequestRecord]) -> dict:
    """TTFT (from the first send) and TPOT (of the attempt that completed) p50/p99 over the completed requests."""
    done = [r for r in records if r.done is not None]
    ttft, tpot = [r.ttft for r in done], [r.tpot for r in done if r.tpot is not None]
    return {"completed": len(done), "ttft_p50_s": _r(percentile(ttft, 50)), "ttft_p99_s": _r(percentile(ttft, 99)),
            "tpot_p50_s": _r(percentile(tpot, 50), 4), "tpot_p99_s": _r(percentile(tpot, 99), 4)}


def meets_slo(r: RequestRecord, ttft_s: float, tpot_s: float) -> bool:
    return r.done is not None and r.ttft <= ttft_s and (r.tpot is None or r.tpot <= tpot_s)


def goodput(records: list[RequestRecord], window_s: float, ttft_s: float, tpot_s: float) -> dict:
    """Requests/s and tokens/s, over the window, of the requests that completed within the SLO."""
    good = [r for r in records if meets_slo(r, ttft_s, tpot_s)]
    return {"requests_per_s": round(len(good) / window_s, 3),
            "tokens_per_s": round(sum(r.tokens for r in good) / window_s, 2), "requests_meeting_slo": len(good)}


def mean_recovery(fault_times: list[float], latencies: list[float | None], end: float) -> dict | None:
    """Mean over faults; a fault not recovered from by `end` counts as (end - fault), which makes the mean a lower
    bound (flagged). None without faults; `s` None when no fault was recovered from at all."""
    if not fault_times:
        return None
    if all(lat is None for lat in latencies):
        return {"s": None, "lower_bound": True}
    vals = [lat if lat is not None else end - f for f, lat in zip(fault_times, latencies)]
    return {"s": round(sum(vals) / len(vals), 3), "lower_bound": any(lat is None for lat in latencies)}


def summarize(run: dict, window_s: float, slo: tuple[float, float]) -> dict:
    """Everything reported for one system (see the module docstring for `run`)."""
    t0, end, records = run["t0"], run["ended"], run["records"]
    faults = [r for r in run["replay"] if delivered(r)]
    fault_times = [r["at"] for r in faults]
    successes = list(run["probes"]) + [(r.attempt_sent, r.done) for r in records if r.done is not None]
    latencies = recovery_latencies(fault_times, successes)
    windows = [(f, f + lat if lat is not None else math.inf) for f, lat in zip(fault_times, latencies)]
    first = fault_times[0] if fault_times else None
    phases = {p: latency_stats([r for r in records if phase_of(r, first, windows, end) == p])
              for p in ("before", "recovery", "after")}
    tokens = sorted(t for r in records for t in r.token_times)
    return {
        "throughput_tokens_per_s": round(sum(t0 <= t < t0 + window_s for t in tokens) / window_s, 2),
        "goodput": goodput(records, window_s, *slo),
        "latency": phases,
        "requests": len(records),
        "completed": sum(r.done is not None for r in records),
        "lost": sum(r.lost for r in records),
        "never_sent": sum(not r.sent for r in records),
        "failed_attempts": sum(r.failed_attempts for r in records),
        "wasted_tokens": sum(r.wasted_tokens for r in records),
        "recovery": [{"t_s": round(f - t0, 3), "worker": r["worker"], "event": r["event"], "outcome": r["outcome"],
                      "latency_s": _r(lat)} for f, r, lat in zip(fault_times, faults, latencies)],
        "faults_not_delivered": [{"t_s": round(r["at"] - t0, 3), "worker": r["worker"], "event": r["event"],
                                  "outcome": r["outcome"]} for r in run["replay"]
                                 if r["event"] in FAULTS and not delivered(r)],
        "mean_recovery": mean_recovery(fault_times, latencies, end),
        "series": rate_series(tokens, t0, max(end, t0 + window_s), window=1.0, step=1.0),
    }


def ratios(ft: dict, rr: dict) -> dict:
    """sglang-ft against restart-and-reload, each with its target and whether it was met."""
    thr = ft["throughput_tokens_per_s"] / rr["throughput_tokens_per_s"] if rr["throughput_tokens_per_s"] else None
    # restart-and-reload served nothing inside the window: no finite ratio, and any throughput at all beats it
    unbounded = not rr["throughput_tokens_per_s"] and ft["throughput_tokens_per_s"] > 0
    mf, mr = ft["mean_recovery"], rr["mean_recovery"]
    rec = mr["s"] / mf["s"] if mf and mr and mf["s"] and mr["s"] is not None else None
    return {"throughput_ft_over_rr": _r(thr, 2), "recovery_rr_over_ft": _r(rec, 1),
            "throughput_ratio_unbounded": unbounded,
            "recovery_ratio_is_lower_bound": bool(mr and mr["lower_bound"]), "ft_lost": ft["lost"],
            "targets": {"throughput_ft_over_rr": f">= {TARGETS['throughput']}x",
                        "recovery_rr_over_ft": f">= {TARGETS['recovery']:g}x", "ft_lost": TARGETS["ft_lost"]},
            "met": {"throughput_ft_over_rr": unbounded or (thr is not None and thr >= TARGETS["throughput"]),
                    "recovery_rr_over_ft": rec is not None and rec >= TARGETS["recovery"],
                    "ft_lost": ft["lost"] == TARGETS["ft_lost"]}}


def what_dominates(report: dict) -> list[str]:
    """One line per system with recoveries: what its recovery latency is made of, from the run's own records (the
    relaunches restart-and-reload made, the stages sglang-ft's `/ft/status` reported)."""
    lines, systems = [], report["systems"]
    rr = systems.get("rr")
    if rr and rr.get("mean_recovery") and rr["mean_recovery"]["s"] is not None:
        restarts = rr.get("system", {}).get("restarts", [])
        healthy = [e["startup_s"] for e in restarts if e["outcome"] == "healthy"]
        if healthy:
            lines.append(
                f"restart-and-reload: {rr['mean_recovery']['s']:.3g} s mean recovery, of which SGLang's relaunch "
                f"{sum(healthy) / len(healthy):.3g} s mean ({len(healthy)} healthy, {len(restarts) - len(healthy)} "
                f"cancelled or failed by a later fault); on this 2-core CPU a launch is process start-up, imports and "
                f"the model load, which dominate the ratio")
    ft = systems.get("ft")
    recoveries = [r for r in (ft or {}).get("system", {}).get("recoveries", []) if r.get("cause") != "rejoin"
                  and r.get("recover_ms") is not None]
    if ft and ft.get("mean_recovery") and ft["mean_recovery"]["s"] is not None and recoveries:
        detect = [r["detect_ms"] for r in recoveries if r.get("detect_ms") is not None]
        recover = [r["recover_ms"] for r in recoveries]
        lines.append(
            f"sglang-ft: {ft['mean_recovery']['s']:.3g} s mean recovery, of which detection "
            f"{sum(detect) / max(1, len(detect)):.0f} ms and the in-place regroup {sum(recover) / len(recover):.0f} "
            f"ms mean ({len(recover)} regroups); the rest is the next request's own prefill and decode")
    return lines


def table(report: dict) -> str:
    """The summary as a markdown table, then the ratios against their targets."""
    keys = [k for k in SYSTEMS if k in report["systems"]]
    s = {k: report["systems"][k] for k in keys}
    c = report["config"]
    pair = lambda a, b, scale=1: "-" if a is None else f"{a * scale:.3g} / {b * scale:.3g}"  # noqa: E731

    def lat(k, phase, what, scale=1):
        p = s[k]["latency"][phase]
        return pair(p[f"{what}_p50_s"], p[f"{what}_p99_s"], scale) + f" ({p['completed']})"

    def recov(k):
        vals = [("never" if r["latency_s"] is None else f"{r['latency_s']:.3g}") for r in s[k]["recovery"]]
        return ", ".join(vals) or "-"

    def mean(k):
        m = s[k]["mean_recovery"]
        if m is None or m["s"] is None:
            return "-" if m is None else "never"
        return (">= " if m["lower_bound"] else "") + f"{m['s']:.3g}"

    rows = [("throughput over the window (tokens/s)", lambda k: f"{s[k]['throughput_tokens_per_s']:.1f}"),
            (f"goodput, SLO TTFT <= {c['slo_ttft_s']:g} s and TPOT <= {c['slo_tpot_s']:g} s (req/s / tokens/s)",
             lambda k: f"{s[k]['goodput']['requests_per_s']:.2f} / {s[k]['goodput']['tokens_per_s']:.1f}"),
            ("requests due / completed / lost", lambda k: f"{s[k]['requests']} / {s[k]['completed']} / {s[k]['lost']}"
             + (f" ({s[k]['never_sent']} never sent)" if s[k]["never_sent"] else "")),
            ("failed attempts seen by clients", lambda k: str(s[k]["failed_attempts"])),
            ("recovery latency per fault (s)", recov),
            ("mean recovery latency (s)", mean)]
    for phase in ("before", "recovery", "after"):
        rows.append((f"TTFT p50 / p99 {phase} (s) (requests)", lambda k, p=phase: lat(k, p, "ttft")))
    for phase in ("before", "recovery", "after"):
        rows.append((f"TPOT p50 / p99 {phase} (ms)", lambda k, p=phase: lat(k, p, "tpot", 1e3)))
    head = (f"| TP {c['tp']}, {c['rate']} req/s {c['arrivals']}, {c['max_new_tokens']} tokens, "
            f"{c['window_s']:g} s: {c['trace_summary']} | " + " | ".join(SYSTEMS[k] for k in keys) + " |")
    lines = [head, "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join(fn(k) for k in keys) + " |" for label, fn in rows]
    r = report.get("ratios")
    if r:
        yes = lambda key: "met" if r["met"][key] else "NOT met"  # noqa: E731
        thr = "unbounded (restart-and-reload served no token in the window)" if r.get("throughput_ratio_unbounded") \
            else f"{r['throughput_ft_over_rr']}x"
        lines += ["", f"- throughput sglang-ft / restart-and-reload: {thr} "
                      f"(target >= {TARGETS['throughput']}x: {yes('throughput_ft_over_rr')})",
                  f"- recovery latency restart-and-reload / sglang-ft: "
                  f"{'>= ' if r['recovery_ratio_is_lower_bound'] else ''}{r['recovery_rr_over_ft']}x "
                  f"(target >= {TARGETS['recovery']:g}x: {yes('recovery_rr_over_ft')})",
                  f"- requests lost by sglang-ft: {r['ft_lost']} (target 0: {yes('ft_lost')})"]
    not_delivered = {k: len(s[k].get("faults_not_delivered", [])) for k in keys}
    if any(not_delivered.values()):
        lines.append("- faults not delivered (the worker had no process), not counted as recoveries: "
                     + ", ".join(f"{SYSTEMS[k]} {n}" for k, n in not_delivered.items()))
    lines += [f"- what dominates: {line}" for line in what_dominates(report)]
    return "\n".join(lines)


def plot(report: dict, path) -> None:
    """Throughput over time (1 s windows): one panel per system on a shared time axis, each with its own scale (a
    restart-and-reload burst draining a backlog would flatten the others' lines on one scale), the trace's events
    and restart-and-reload's restarts marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in SYSTEMS if k in report["systems"]]
    fig, axes = plt.subplots(len(keys), 1, figsize=(11, 1.2 + 2.0 * len(keys)), sharex=True, squeeze=False)
    styles = {"kill": ("tab:red", "--"), "hang": ("tab:purple", "--"), "resume": ("tab:purple", ":"),
              "rejoin": ("tab:green", ":")}
    end = max((t for k in keys for t, _ in report["systems"][k]["series"]), default=0.0)
    for ax, key, color in zip(axes[:, 0], keys, ("tab:blue", "tab:orange", "tab:gray")):
        series = report["systems"][key]["series"]
        ax.plot([t for t, _ in series], [v for _, v in series], color=color, label=SYSTEMS[key])
        seen = set()
        for e in report["trace"]["events"]:
            c, style = styles[e["event"]]
            ax.axvline(e["t_s"], color=c, linestyle=style, label=None if e["event"] in seen else f"{e['event']}")
            seen.add(e["event"])
        ax.axvline(report["config"]["window_s"], color="black", linewidth=0.8, label="end of arrivals")
        restarts = report["systems"][key].get("system", {}).get("restarts", [])
        for i, e in enumerate(restarts):  # from the failure detected to healthy again (or the end)
            if e["outcome"] == "healthy" or i == len(restarts) - 1:
                ax.axvspan(e["detected_s"], e.get("healthy_s", end), color="tab:orange", alpha=0.12,
                           label="restarting" if "down" not in seen else None)
                seen.add("down")
        ax.set_ylim(bottom=0)
        ax.set_ylabel("tokens/s")
        ax.set_title(SYSTEMS[key], fontsize=9, loc="left")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)
    axes[-1, 0].set_xlabel("seconds since the load started (1 s windows)")
    c = report["config"]
    fig.suptitle(f"Throughput under the same fault trace (TP {c['tp']}, {c['rate']} req/s, tiny model on CPU)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
