"""Markdown tables of one sweep run (for bench/RESULTS.md).

    python -m bench.report bench/results/sweep_cpu_quick.csv [--run RUN_ID]

One line per (point, provider): median fwd / bwd / fwd+bwd times in ms (p20-p80 of fwd+bwd),
peak memory of fwd+bwd above the inputs, the share of the measured matmul rate that the
8·R·|C|·d FLOPs of fwd+bwd reach, and the status (refusals and failures included).
"""
from __future__ import annotations

import argparse
from collections import OrderedDict
from pathlib import Path

from .records import number, read_rows

HEADER = ("| preset | labels | N | L | K | provider | fwd ms | bwd ms | fwd+bwd ms (p20–p80) | peak MB | "
          "pred MB | roofline | status |")


def _ms(v):
    if v is None:
        return ""
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def tables(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)\n"
    first = rows[0]
    out = [f"Run `{first['run_id']}`, {first['date']}, commit `{first['git_commit']}`, device {first['device']} "
           f"({first['device_name']}), torch {first['torch']}, {first['threads']} threads, "
           f"matmul rate {first['matmul_gflops_s'] or '?'} GFLOP/s ({first['dtype']}).", ""]
    groups: "OrderedDict[tuple, dict]" = OrderedDict()
    for r in rows:
        key = (r["series"], r["preset"], r["regime"], r["N"], r["L"], r["d"], r["dtype"], r["provider"])
        groups.setdefault(key, {})[r["mode"]] = r
    presets = list(dict.fromkeys(k[1] for k in groups))
    providers = list(dict.fromkeys(k[7] for k in groups))
    for series in ("N", "L"):
        size = 3 if series == "N" else 4
        keys = sorted((k for k in groups if k[0] == series),
                      key=lambda k: (presets.index(k[1]), k[6], int(k[size]), providers.index(k[7])))
        if not keys:
            continue
        fixed = "L" if series == "N" else "N"
        out += [f"### {'N grows' if series == 'N' else 'L grows'} (fixed {fixed}, d={keys[0][5]}, {keys[0][6]})", "",
                HEADER, "|" + "---|" * (HEADER.count("|") - 1)]
        for key in keys:
            modes = groups[key]
            full = modes.get("full", {})
            status = full.get("status", "")
            cells = [key[1], key[2], key[3], key[4], full.get("K", ""), key[7]]
            if status == "ok":
                spread = f"{_ms(number(full, 'p20_ms'))}–{_ms(number(full, 'p80_ms'))}"
                frac = number(full, "roofline_frac")
                cells += [_ms(number(modes.get("fwd", {}), "median_ms")), _ms(number(modes.get("bwd", {}), "median_ms")),
                          f"{_ms(number(full, 'median_ms'))} ({spread})", full.get("peak_MB", ""),
                          full.get("pred_MB", ""), f"{100 * frac:.2g}%" if frac is not None else "", "ok"]
            else:
                cells += ["", "", "", "", full.get("pred_MB", ""), "", status]
            out.append("| " + " | ".join(str(c) for c in cells) + " |")
        out.append("")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__)
    ap.add_argument("csv", type=Path)
    ap.add_argument("--run", default="latest")
    args = ap.parse_args(argv)
    print(tables(read_rows(args.csv, args.run)), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
