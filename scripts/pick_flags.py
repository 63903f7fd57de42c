"""Print the engine flags of an evaluation's pick: `python scripts/pick_flags.py runs/gpu-dev` -> --p1 0.95 ...

(The device runbook passes them to the benchmarks, so they measure what the evaluation chose.)"""

import json
import sys

from nanodp.eval.harness import parse_method

m = parse_method(json.load(open(f"{sys.argv[1]}/results.json"))["pick"])["sparse"]
flags = [f"--p1 {m['p1']}", f"--p2 {m['p2']}"]
flags.append("--floor " + (f"{100 * m['floor_frac']:g}%" if m["floor_frac"] else str(m["floor"])))
flags.append(f"--group-rule {m.get('group_rule', 'mean')} --{'' if m.get('whole') else 'no-'}whole")
flags.append(f"--estimate {m.get('estimate', 'centroid')}")
print(" ".join(flags))
