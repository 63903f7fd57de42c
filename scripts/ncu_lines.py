"""The source lines of a kernel where its warps stall most, from Nsight Compute's source page as CSV:

    ncu -i REPORT.ncu-rep --page source --csv --print-source cuda > src.csv; python scripts/ncu_lines.py src.csv

Prints the header it found, then the top lines by the first column whose name holds "Warp Stall Sampling"
(all samples), with their share of the kernel's samples and the source text."""

import csv
import sys

rows = list(csv.reader(open(sys.argv[1], errors="replace")))
top = int(sys.argv[2]) if len(sys.argv) > 2 else 30
hdr_i = next((i for i, r in enumerate(rows) if any("Sampling" in c for c in r)), None)
if hdr_i is None:
    print("no stall-sampling column; first rows:", *rows[:6], sep="\n")
    raise SystemExit
hdr = rows[hdr_i]
print("columns:", hdr)
col = next(i for i, c in enumerate(hdr) if "Warp Stall Sampling" in c and "Not" not in c)
src = next((i for i, c in enumerate(hdr) if c.strip().lower() in ("source", "source code")), 1)
num = lambda s: float(s.replace(",", "") or 0)  # noqa: E731
body = [r for r in rows[hdr_i + 1 :] if len(r) > col]
tot = sum(num(r[col]) for r in body) or 1.0
for r in sorted(body, key=lambda r: -num(r[col]))[:top]:
    print(f"{100 * num(r[col]) / tot:5.1f}%  {r[0][:8]:>8}  {r[src].strip()[:150]}")
