"""Benchmarks: `python -m nanodp.bench SECTION [options]` (SECTION --help lists its options).

A section is a function `section(argv) -> (args, results)`: it parses its own options with a parser built on
`common_parser()` (so --quick and --out work everywhere), prints its tables, and returns a JSON-able dict.
`main` prints one final JSON line (environment + results) and writes it to --out. Sections are imported
only when asked for.
"""

import importlib
import json
import sys

from .. import parallel
from .timing import environment

SECTIONS = {
    "kernels": ".kernels:bench_kernels",
    "cluster": ".cluster:section_cluster",
    "sparse": ".sparse:section_sparse",
    "e2e": ".e2e:bench_e2e",
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in SECTIONS:
        names = ", ".join(SECTIONS)
        print(f"usage: python -m nanodp.bench SECTION [options]   (SECTION: {names}; SECTION --help for its options)")
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    mod, fn = SECTIONS[argv[0]].split(":")
    args, results = getattr(importlib.import_module(mod, __package__), fn)(argv[1:])
    line = json.dumps({"section": argv[0], "env": environment(), "results": results}, default=str)
    if getattr(args, "out", None) and parallel.is_main():
        with open(args.out, "w") as f:
            f.write(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
