"""results.json to results.md: the tables a person reads."""

from __future__ import annotations

import re
from typing import Any

CPU_NOTE = (
    "CPU is user+system seconds. 'here' is the process tree the harness ran and waited for, "
    "with every descendant it reaped: for bakgrab the client (`bakgrab backup`, its one-shot "
    "sshd, the gate, rrsync and the rsync sender); for bare rsync and rsnapshot the local "
    "rsync receiver and ssh (and rsnapshot's perl); for borg all of borg; for scenario 7 the "
    "removing command. 'servers' is the growth of the long-lived servers' counters (each "
    "process's own and its reaped children's): for bakgrab the Celery worker (main process, "
    "prefork pool, their rsync receivers and ssh) and redis-server; for bare rsync and "
    "rsnapshot our sshd (per-connection sshd and the rsync sender). Every column covers both "
    "ends of the transfer, all on this one machine."
)


def fmt_s(x: float | None) -> str:
    return "–" if x is None else (f"{x:.3f}" if x < 1 else f"{x:.2f}")


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "–"
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.1f} {unit}"
        n /= 1024
    return f"{sign}{n:.1f} GiB"


def fmt_ratio(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def short_version(text: str) -> str:
    """``rsync  version 3.5.0  protocol version 32`` -> ``3.5.0``."""
    m = re.search(r"(?<![0-9A-Za-z.])(\d+\.\d+(?:\.\d+)?(?:p\d+)?(?:-\d+)?)", text)
    return m.group(1) if m else text


def load(doc: dict[str, Any], when: str) -> str:
    values = doc.get("load_average", {}).get(when) or []
    return "/".join(f"{v:.2f}" for v in values) or "?"


def row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def markdown(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    v = doc["versions"]
    t = doc["tree"]
    labels = {k: tool["label"] for k, tool in doc["tools"].items()}
    out = [
        f"# bakgrab benchmark ({doc['mode']} mode)",
        "",
        f"`{doc['command']}` on {doc['date']}, {doc['duration_seconds']:.0f} s in all; "
        f"load average {load(doc, 'start')} at the start, {load(doc, 'end')} at the end.",
        "",
        f"Machine: {m['nproc']} cores ({m['cpu']}), {m['memory']} RAM, disk {m['disk']}, "
        f"{m['os']}, kernel {m['kernel']}, as {m['user']}.",
        "",
        f"Storage: {doc.get('storage', '?')}.",
        "",
        "Versions: " + ", ".join(f"{k} {short_version(val)}" for k, val in v.items()) + ".",
        "",
        f"Tree (seed {t['seed']}): {t['files']} names ({t['regular_files']} regular files, "
        f"{t['hard_links']} extra hard links, {t['symlinks']} symlinks of which "
        f"{t['dangling_symlinks']} dangling), {t['directories']} directories, "
        f"{t['large_files']} large file(s), {fmt_bytes(t['bytes'])} of data. Medians of "
        f"{doc['runs']} runs ({doc['runs_scenario6']} for scenario 6); min–max in brackets.",
        "",
        "| scenario | tool | wall s | CPU s (here + servers) | bytes added | inodes added |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for sid, sc in doc["scenarios"].items():
        if sid == "6":
            continue
        for key, res in sc["tools"].items():
            med, mm = res["median"], res["min_max"]
            out.append(row([
                f"{sid}. {sc['title']}", labels[key],
                f"{fmt_s(med['wall'])} [{fmt_s(mm['wall'][0])}–{fmt_s(mm['wall'][1])}]",
                f"{fmt_s(med['cpu'])} ({fmt_s(med['cpu_local'])} + {fmt_s(med['cpu_server'])})",
                fmt_bytes(med["bytes_added"]), f"{med['inodes_added']:.0f}",
            ]))
    s8 = doc["scenarios"].get("8")
    if s8 and s8.get("skipped"):
        out += ["", f"Scenario 8 was not run: {s8['skipped']}."]
    elif s8:
        lk = s8["link"]
        out += ["", f"Scenario 8: a first backup of `{s8['source']}` from a client in a network "
                    f"namespace behind a veth link limited to {lk['rate_mbit']} Mbit/s each way "
                    f"({lk['qdisc']}), medians of {s8['runs']} runs; bakgrab runs with "
                    "`compress = auto`."]
    s6 = doc["scenarios"].get("6")
    if s6:
        n = len(s6["clients"])
        out += [
            "",
            f"Scenario 6: {n} clients, each with one top-level directory (1/{n} of the tree), "
            "all at once against one after another; wall s of the whole batch.",
            "",
            "| tool | first backups: at once | one after another | ratio | CPU at once / serial "
            "| second backups: at once | one after another | ratio |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for key, res in s6["tools"].items():
            c, s = res["concurrent"]["median"], res["serial"]["median"]
            second = ["–", "–", "–"]
            if res.get("concurrent_incremental"):
                ci = res["concurrent_incremental"]["median"]
                si = res["serial_incremental"]["median"]
                second = [fmt_s(ci["wall"]), fmt_s(si["wall"]),
                          fmt_ratio(res["ratio_incremental"])]
            out.append(row([
                labels[key], fmt_s(c["wall"]), fmt_s(s["wall"]), fmt_ratio(res["ratio"]),
                f"{fmt_s(c['cpu'])} / {fmt_s(s['cpu'])}", *second,
            ]))
    checked = doc.get("verify")
    if checked:
        out += ["", "Newest trees after scenario 4 against the source (`rsync -naHAX --checksum "
                    "--delete`): " + ", ".join(f"{labels[k]} {v['differences']} differences"
                                               for k, v in checked.items()) + "."]
    deletes = doc.get("btrfs_delete_by_files")
    if deletes:
        out += ["", "Removing a read-only btrfs snapshot by the worker's own call "
                    "(`retention.remove_snapshot`): " + ", ".join(
                        f"{int(n):,} files {fmt_s(s)} s" for n, s in deletes.items()) + "."]
    out += ["", "## Goals", "", "| goal | measured | limit | met |", "| --- | --- | --- | --- |"]
    for g in doc["goals"]:
        val = g["value"]
        if g["unit"] == "fraction":
            shown = "–" if val is None else f"{val * 100:.2f}%"
            limit = "–" if g["limit"] is None else f"{g['limit'] * 100:.0f}%"
        else:
            shown = "–" if val is None else f"{val:.2f}"
            limit = "–" if g["limit"] is None else f"<= {g['limit']:.2f}"
        met = {True: "yes", False: "**no**", None: "(reported)"}[g["met"]]
        out.append(row([g["goal"], shown, limit, met]))
    fc = doc.get("fixed_cost")
    if fc and fc.get("median"):
        md = fc["median"]
        out += [
            "",
            "## Where the fixed cost of one job goes (scenario 5, bakgrab, medians)",
            "",
            "| part | s |",
            "| --- | --- |",
            row(["client start to worker `received` (client start-up, keys, one-shot sshd, "
                 "broker, send, queue, pickup)", fmt_s(md["client_start_to_worker_received"])]),
            row(["worker task runtime (Celery)", fmt_s(md["worker_task_runtime"])]),
            row(["of which the grab itself (reported `duration`)",
                 fmt_s(md.get("grab_duration_reported"))]),
            row(["worker done to client exit (result delivery, teardown)",
                 fmt_s(md["worker_done_to_client_exit"])]),
            row(["client wall time", fmt_s(md["client_wall"])]),
            row(["`bakgrab --version` (interpreter and CLI start-up alone)",
                 fmt_s(fc.get("bakgrab_cli_startup"))]),
        ]
    mem = doc.get("worker_memory")
    if mem:
        out += [
            "",
            f"Worker memory during {mem['clients']} concurrent first backups (medians over "
            f"{mem.get('runs', 1)} runs): PSS "
            f"{mem['idle_pss_kib'] / 1024:.0f} MiB idle ({mem['idle_processes']} processes), "
            f"{mem['peak_pss_kib'] / 1024:.0f} MiB at peak ({mem['peak_processes']} processes): "
            f"**{mem['per_grab_pss_kib'] / 1024:.1f} MiB per concurrent grab** "
            f"(RSS {mem['idle_rss_kib'] / 1024:.0f} → {mem['peak_rss_kib'] / 1024:.0f} MiB).",
        ]
    out += ["", doc["cpu_note"], ""]
    return "\n".join(out)
