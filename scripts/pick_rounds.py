"""The round-count rule, fixed before the runs it judges: `python scripts/pick_rounds.py runs/k10 runs/k6 [...]`.

Each folder is a development-seed evaluation (same prompts) of the default Double-P method at one number of
k-means rounds (`--kmeans-iters`), the first at the current default. A run with fewer rounds replaces it only if
its RULER is at least the default's minus 0.5 points, it loses no more passkeys, and its KV read at the longest
length is within 0.5 points; among those the fewest rounds win. Prints one line per run, then the pick.
"""

import json
import sys

METHOD = "doublep-gauss:0.95:0.7:f15%"
rows = []
for d in sys.argv[1:]:
    R = json.load(open(f"{d}/results.json"))
    s, iters = R["summary"][METHOD], R["meta"]["args"]["kmeans_iters"]
    dense = R["summary"]["dense"]
    rows.append(
        (iters, 100 * s["ruler"], s["pk_lost"], 100 * s["kv_bytes_max_len"], s["complete"], R["meta"]["prompts_sha"])
    )
    print(
        f"{d}: {iters} rounds, RULER {rows[-1][1]:.2f} (dense {100 * dense['ruler']:.2f}), passkeys lost {s['pk_lost']}"
        f"/{s['pk_n']}, KV@{s['max_len']} {rows[-1][3]:.2f}%, complete {s['complete']}"
    )
base = rows[0]
assert all(r[5] == base[5] for r in rows), "the runs saw different prompts"
ok = [r for r in rows[1:] if r[4] and base[4] and r[1] >= base[1] - 0.5 and r[2] <= base[2] and r[3] <= base[3] + 0.5]
pick = min(ok, key=lambda r: r[0])[0] if ok else base[0]
print(f"pick: {pick} rounds")
