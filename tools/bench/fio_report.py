#!/usr/bin/python3
"""Turns the fio JSON files written by tools/bench/bench.sh into a markdown
report: one table of raw numbers (a row per server, a column per job) and
one table of ratios for each "subject" server (mirrord, and any later rows
such as replicated mirrord) against each reference server and the best one.

usage: fio_report.py RAWDIR OUT.md ROUNDS SERVER:ROLE [SERVER:ROLE ...]
  ROLE is ceiling (plain file), subject (ours), reference (others) or
  variant (ours with other settings: CPU and target tables only).
  RAWDIR/SERVER/JOB.rN.json (N = 1..ROUNDS) are fio --output-format=json
  files; RAWDIR/SERVER/JOB.rN.cpu the CPU samples bench.sh took during that
  job ("server_seconds machine_busy_fraction window_seconds
  machine_busy_seconds", then the seconds of each server process). A missing
  or failed file shows as "n/a" (RAWDIR/SERVER/ERROR, if present, says why).

Every cell is the median of the rounds that produced a number; the spread
table gives the lowest and highest.

Ratios: for IOPS and MiB/s, subject / reference (above 1 means the subject
is faster); for latency, reference / subject (above 1 still means the
subject is better).

The report ends with the targets of issue 21 (the replicated write's cost)
and each figure's distance from its target: CPU per operation of the pair
against the single node from the busy-poll-off rows (mirrord-pair-c-bp0,
mirrord-bp0), per process and for the whole machine less fio; the pair's
QD1 latency against the single node's plus the loopback TCP round trip
plus 15 µs; the pair's 4K QD32 write IOPS against the single node's; and
the single node and the pair's reads against the best reference. When
bench.sh ran tools/bench/loopback_floor.py (RAWDIR/loopback-floor.md), the
floor it measured under the 1M CPU ratio (the kernel's loopback TCP transfer
and the peer's page-cache write, no nbd-mirror code) is a row there too.
"""
import json
import os
import sys

# job name -> (title, fio section, metric, unit, higher_is_better)
JOBS = [
    ("randwrite-4k-qd32", "4K rand write QD32", "write", "iops", "IOPS", True),
    ("randread-4k-qd32", "4K rand read QD32", "read", "iops", "IOPS", True),
    ("seqwrite-1m-qd8", "1M seq write QD8", "write", "mib", "MiB/s", True),
    ("seqread-1m-qd8", "1M seq read QD8", "read", "mib", "MiB/s", True),
    ("lat-4k-qd1", "4K write QD1 latency", "write", "lat_us", "usec", False),
]


def fio_job(path):
    """fio's JSON for the one job in PATH, or None if missing or failed."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    # fio's nbd engine may print a line before the JSON when --output is not used.
    start = text.find("{")
    if start < 0:
        return None
    try:
        data = json.loads(text[start:])
        job = data["jobs"][0]
    except (ValueError, KeyError, IndexError):
        return None
    if job.get("error", 0) != 0:
        return None
    return job


def metric(path, section, kind):
    """The number for one job, or None if the run is missing or failed."""
    job = fio_job(path)
    if job is None:
        return None
    s = job[section]
    if s.get("io_bytes", 0) == 0:
        return None
    if kind == "iops":
        return float(s["iops"])
    if kind == "mib":
        return float(s["bw_bytes"]) / (1024 * 1024)
    if kind == "lat_us":
        return float(s["lat_ns"]["mean"]) / 1000.0
    raise ValueError(kind)


def tcp_floor(rawdir):
    """Mean round trip of the tcp_floor samples (start, end) as text, or None."""
    samples = []
    for name in ("start", "end"):
        v = metric(os.path.join(rawdir, "tcp-floor", name + ".json"), "write", "lat_us")
        samples.append(f"{v:.1f} ({name})" if v is not None else f"n/a ({name})")
    if all(s.startswith("n/a") for s in samples):
        return None
    return ", ".join(samples)


def median(xs):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def cpu_sample(rawdir, name, job, section, kind, rnd):
    """(server us, fio us, machine busy fraction, machine us less fio, [us of each
    server process]) per operation (per MiB for MiB/s jobs) for one round, or None."""
    base = os.path.join(rawdir, name, f"{job}.r{rnd}")
    rate = metric(base + ".json", section, "mib" if kind == "mib" else "iops")
    j = fio_job(base + ".json")
    try:
        with open(base + ".cpu") as f:
            fields = [float(x) for x in f.read().split()]
        server_s, busy, window, machine_s = fields[0], fields[1], fields[2], fields[3]
        each = fields[4:]
    except (OSError, ValueError, IndexError):
        return None
    if rate is None or j is None or rate <= 0 or window <= 0:
        return None
    fio_cores = (float(j.get("usr_cpu", 0)) + float(j.get("sys_cpu", 0))) / 100.0
    per_op = 1e6 / window / rate
    # fio's usr/sys CPU is a share of its measured runtime, which is the sampled window.
    machine_less_fio = (machine_s - fio_cores * window) * per_op
    return (
        server_s * per_op,
        fio_cores / rate * 1e6,
        busy,
        machine_less_fio,
        [e * per_op for e in each],
    )


def fmt(v, unit):
    if v is None:
        return "n/a"
    if unit == "usec":
        return f"{v:.1f}"
    return f"{v:,.0f}"


def ratio(subject, ref, higher_is_better):
    if subject is None or ref is None or subject == 0 or ref == 0:
        return None
    return subject / ref if higher_is_better else ref / subject


def rtt_us(rawdir):
    """The loopback 4 KiB TCP round trip of this run (mean of the samples), or None."""
    got = [
        metric(os.path.join(rawdir, "tcp-floor", n + ".json"), "write", "lat_us")
        for n in ("start", "end")
    ]
    got = [v for v in got if v is not None]
    return sum(got) / len(got) if got else None


def target_row(what, value, target, met, distance):
    """One row of the targets table; value/target are text, met None if unknown."""
    verdict = "n/a" if met is None else ("met" if met else "**not met**")
    return f"| {what} | {value} | {target} | {distance} | {verdict} |"


def cpu_ratio_rows(cpu, job, unit, single, pair):
    """The pair's CPU per operation against the single node's on JOB: per process
    (server CPU, both daemons) and for the whole machine less fio. Target <= 2.2."""
    rows = []
    s, p = cpu.get((single, job)), cpu.get((pair, job))
    for what, i in (("per process", 0), ("whole machine less fio", 3)):
        title = f"{pair} ÷ {single}, CPU per {unit}, {what}"
        if s is None or p is None or s[i] <= 0:
            rows.append(target_row(title, "n/a", "≤ 2.20x", None, "n/a"))
            continue
        r = p[i] / s[i]
        value = f"{r:.2f}x ({p[i]:.1f} ÷ {s[i]:.1f} µs)"
        rows.append(target_row(title, value, "≤ 2.20x", r <= 2.2, f"{r - 2.2:+.2f}x"))
    return rows


def floor_ratio(rawdir):
    """The floor ratio tools/bench/loopback_floor.py printed into RAWDIR/loopback-floor.md
    (its last line, "floor-ratio R"), or None."""
    try:
        with open(os.path.join(rawdir, "loopback-floor.md")) as f:
            lines = f.read().split("\n")
    except OSError:
        return None
    for line in lines:
        if line.startswith("floor-ratio "):
            try:
                return float(line.split()[1])
            except (IndexError, ValueError):
                return None
    return None


def floor_lines(rawdir):
    """loopback_floor.py's table, if bench.sh ran it."""
    try:
        with open(os.path.join(rawdir, "loopback-floor.md")) as f:
            text = f.read().strip()
    except OSError:
        return []
    return ["", "The kernel's cost of a replicated MiB on this machine, no nbd-mirror code "
            "(tools/bench/loopback_floor.py; CPU per MiB moved, the receiver writing it into "
            "a file's page cache):", "", text]


def target_lines(rawdir, values, cpu, servers):
    """The targets of issue 21 and how far each figure of this run is from its target."""
    names = {n for n, _ in servers}
    out = ["", "Targets (issue 21; ratios of medians measured in this run):", ""]
    out.append("| target | this run | target | distance | |")
    out.append("|---|---:|---:|---:|---|")
    single, pair = "mirrord", "mirrord-pair-c"
    single0, pair0 = "mirrord-bp0", "mirrord-pair-c-bp0"
    if single0 in names and pair0 in names:
        out += cpu_ratio_rows(cpu, "seqwrite-1m-qd8", "MiB (1M seq write QD8, busy-poll 0)", single0, pair0)
        floor = floor_ratio(rawdir)
        title = "floor under that ratio here: the kernel's loopback transfer (loopback_floor.py)"
        if floor is None:
            out.append(target_row(title, "n/a", "≤ 2.20x", None, "n/a"))
        else:
            out.append(target_row(title, f"{floor:.2f}x", "≤ 2.20x", floor <= 2.2,
                                  f"{floor - 2.2:+.2f}x"))
        out += cpu_ratio_rows(cpu, "randwrite-4k-qd32", "write (4K rand write QD32, busy-poll 0)", single0, pair0)
    if single in names and pair in names:
        lat_s, lat_p = values.get((single, "lat-4k-qd1")), values.get((pair, "lat-4k-qd1"))
        rtt = rtt_us(rawdir)
        title = "pair's 4K QD1 write latency ≤ single + loopback RTT + 15 µs"
        if None in (lat_s, lat_p, rtt):
            out.append(target_row(title, "n/a", "n/a", None, "n/a"))
        else:
            bound = lat_s + rtt + 15
            out.append(target_row(
                title, f"{lat_p:.1f} µs", f"≤ {bound:.1f} µs ({lat_s:.1f} + {rtt:.1f} + 15)",
                lat_p <= bound, f"{lat_p - bound:+.1f} µs"))
        iops_s = values.get((single, "randwrite-4k-qd32"))
        iops_p = values.get((pair, "randwrite-4k-qd32"))
        title = "pair's 4K rand write QD32 IOPS ÷ single node's"
        if None in (iops_s, iops_p) or not iops_s:
            out.append(target_row(title, "n/a", "≥ 0.80x", None, "n/a"))
        else:
            r = iops_p / iops_s
            out.append(target_row(title, f"{r:.2f}x ({iops_p:,.0f} ÷ {iops_s:,.0f})", "≥ 0.80x",
                                  r >= 0.8, f"{r - 0.8:+.2f}x"))
    refs = [n for n, r in servers if r == "reference"]
    rows = [(single, [j[0] for j in JOBS]), (pair, ["seqread-1m-qd8", "randread-4k-qd32"])]
    for name, jobs in rows:
        if name not in names or not refs:
            continue
        for job, title, _, _, _, hib in JOBS:
            if job not in jobs:
                continue
            present = [values[(r, job)] for r in refs if values.get((r, job)) is not None]
            r = None
            if present:
                r = ratio(values.get((name, job)), max(present) if hib else min(present), hib)
            what = f"{name} ÷ best reference, {title}"
            if r is None:
                out.append(target_row(what, "n/a", "≥ 1.00x", None, "n/a"))
            else:
                out.append(target_row(what, f"{r:.2f}x", "≥ 1.00x", r >= 1.0, f"{r - 1.0:+.2f}x"))
    return out


def main():
    if len(sys.argv) < 5:
        sys.exit(__doc__)
    rawdir, out = sys.argv[1], sys.argv[2]
    rounds = int(sys.argv[3])
    servers = []
    for arg in sys.argv[4:]:
        name, _, role = arg.partition(":")
        if role not in ("ceiling", "subject", "reference", "variant"):
            sys.exit(f"bad role in {arg!r}")
        servers.append((name, role))

    values = {}
    spread = {}
    cpu = {}
    for name, _ in servers:
        for job, _, section, kind, _, _ in JOBS:
            runs = [
                metric(os.path.join(rawdir, name, f"{job}.r{r}.json"), section, kind)
                for r in range(1, rounds + 1)
            ]
            got = [v for v in runs if v is not None]
            values[(name, job)] = median(got)
            spread[(name, job)] = (min(got), max(got), len(got)) if got else None
            samples = [cpu_sample(rawdir, name, job, section, kind, r) for r in range(1, rounds + 1)]
            samples = [c for c in samples if c is not None]
            if samples:
                n_each = min(len(c[4]) for c in samples)
                each = [median([c[4][k] for c in samples]) for k in range(n_each)]
                cpu[(name, job)] = tuple(median([c[i] for c in samples]) for i in range(4)) + (each,)
            else:
                cpu[(name, job)] = None

    lines = []
    head = "| server | " + " | ".join(f"{t} ({u})" for _, t, _, _, u, _ in JOBS) + " |"
    lines.append(head)
    lines.append("|---|" + "---:|" * len(JOBS))
    for name, role in servers:
        label = f"{name} (ceiling)" if role == "ceiling" else name
        cells = [fmt(values[(name, job)], unit) for job, _, _, _, unit, _ in JOBS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Spread over the rounds (lowest–highest, and how many of {rounds} gave a number):")
    lines.append("")
    lines.append(head)
    lines.append("|---|" + "---:|" * len(JOBS))
    for name, role in servers:
        cells = []
        for job, _, _, _, unit, _ in JOBS:
            sp = spread[(name, job)]
            cells.append("n/a" if sp is None else f"{fmt(sp[0], unit)}–{fmt(sp[1], unit)} ({sp[2]})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "CPU per operation (per MiB for the 1M jobs), median over the rounds: server µs (for "
        "several server processes, each in brackets in start order: primary + peer) + fio µs; "
        "then the whole machine's busy CPU per operation less fio's (m, which also counts "
        "loopback softirq work charged to fio and any other job on the machine), and how busy "
        "the machine's CPUs were (100% = every CPU busy; then the row is CPU-bound):"
    )
    lines.append("")
    lines.append("| server | " + " | ".join(t for _, t, _, _, _, _ in JOBS) + " |")
    lines.append("|---|" + "---:|" * len(JOBS))
    for name, role in servers:
        cells = []
        for job, _, _, _, _, _ in JOBS:
            c = cpu[(name, job)]
            if c is None:
                cells.append("n/a")
                continue
            each = " [" + " + ".join(f"{e:.1f}" for e in c[4]) + "]" if len(c[4]) > 1 else ""
            cells.append(f"{c[0]:.1f}{each} + {c[1]:.1f}, m {c[3]:.1f} ({c[2] * 100:.0f}%)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    notes = []
    for name, _ in servers:
        err = os.path.join(rawdir, name, "ERROR")
        if os.path.exists(err):
            with open(err) as f:
                notes.append(f"- {name}: {f.read().strip()}")

    refs = [n for n, r in servers if r == "reference"]
    ratio_lines = []
    for subject, role in servers:
        if role != "subject":
            continue
        ratio_lines.append("")
        ratio_lines.append(f"Ratios for **{subject}** (above 1.00 means {subject} is better):")
        ratio_lines.append("")
        ratio_lines.append("| vs | " + " | ".join(t for _, t, _, _, _, _ in JOBS) + " |")
        ratio_lines.append("|---|" + "---:|" * len(JOBS))
        for ref in refs:
            cells = []
            for job, _, _, _, _, hib in JOBS:
                r = ratio(values[(subject, job)], values[(ref, job)], hib)
                cells.append("n/a" if r is None else f"{r:.2f}")
            ratio_lines.append(f"| {ref} | " + " | ".join(cells) + " |")
        cells = []
        for job, _, _, _, _, hib in JOBS:
            present = [values[(r, job)] for r in refs if values[(r, job)] is not None]
            if not present:
                cells.append("n/a")
                continue
            best = max(present) if hib else min(present)
            r = ratio(values[(subject, job)], best, hib)
            cells.append("n/a" if r is None else f"{r:.2f}")
        ratio_lines.append("| best reference | " + " | ".join(cells) + " |")
        if subject != "mirrord" and ("mirrord", "subject") in servers:
            # Replicated rows: the cost of mirroring against the single node.
            cells = []
            for job, _, _, _, _, hib in JOBS:
                r = ratio(values[(subject, job)], values[("mirrord", job)], hib)
                cells.append("n/a" if r is None else f"{r:.2f}")
            ratio_lines.append("| mirrord (single node) | " + " | ".join(cells) + " |")

    floor = tcp_floor(rawdir)
    if floor:
        ratio_lines.append("")
        ratio_lines.append(
            "Loopback TCP round trip, 4 KiB ping-pong (fio net engine; the floor under a "
            "replicated write's trip to the peer): " + floor + " usec mean."
        )
    ratio_lines += target_lines(rawdir, values, cpu, servers)
    ratio_lines += floor_lines(rawdir)

    text = "\n".join(lines + ratio_lines)
    if notes:
        text += "\n\nNot measured:\n" + "\n".join(notes)
    print(text)
    with open(out, "a") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
