"""Find which layer and head make Double-P lose a passkey: `python scripts/trace_heads.py [--p 0.99]`
(other eval prompts: --task multi_key --depth 0.5 --seed 1; --p1/--p2 for two cuts, --estimate gauss).

Teacher-forces dense's greedy answer to a 1K passkey prompt (default model, CPU fp32), then runs Double-P in one
layer at a time (dense elsewhere) and prints, per layer, the next-token KL against dense on the first digit
steps and the per-query-head output error |o - o_dense| / |o_dense| of that layer.
"""
import argparse

from nanodp.config import SparseConfig
from nanodp.engine import Engine
from nanodp.eval_metrics import teacher_force
from nanodp.kernels.decode import decode_ref
from nanodp.tasks import make_tasks


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--p", type=float, default=0.99, help="p1 = p2")
    ap.add_argument("--p1", type=float, default=None, help="with --p2: two cuts instead of --p")
    ap.add_argument("--p2", type=float, default=None)
    ap.add_argument("--estimate", default="centroid", choices=["centroid", "gauss"])
    ap.add_argument("--task", default="passkey")
    ap.add_argument("--depth", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    p1, p2 = (args.p1, args.p2) if args.p1 is not None else (args.p, args.p)
    eng = Engine(None, device="cpu", dtype="fp32", max_batch=1, max_len=1100, quiet=True, eager=True,
                 sparse=SparseConfig(attention="dense"))
    task = make_tasks(eng.tok, [args.task], [1024], [args.depth], 1, args.seed)[0]
    ids = [task["prompt_ids"]]
    feed, lpd = teacher_force(eng, ids, args.steps)
    print(f"{task['id']}: answer {task['answers']}, dense answer {eng.tok.decode(feed[0].tolist())!r}")
    eng.set_sparse(SparseConfig(attention="doublep", p1=p1, p2=p2, estimate=args.estimate, floor_frac=0.0))
    state = {"layer": -1, "sparse": -1, "err": {}}
    attend, sparse = eng.ctx.attend, eng.ctx.sparse_fn

    def attend_one(li, *args):
        state["layer"] = li
        return attend(li, *args)

    def sparse_one(q, layer, lens, ts, *a, **kw):  # Double-P in one layer only, dense attention elsewhere
        o, st = sparse(q, layer, lens, ts, *a, **kw)
        dense = decode_ref(q, layer.k, layer.v, lens)
        if state["layer"] != state["sparse"]:
            return dense, st
        state["err"].setdefault(int(lens[0]), ((o - dense).norm(dim=-1) / dense.norm(dim=-1))[0].tolist())
        return o, st
    eng.ctx.attend, eng.ctx.sparse_fn = attend_one, sparse_one
    for li in range(eng.cfg.num_hidden_layers):
        state["sparse"], state["err"] = li, {}
        _, lp = teacher_force(eng, ids, args.steps, feed)
        kl = (lpd.exp() * (lpd - lp)).sum(-1)[0].tolist()
        worst = max(state["err"].items(), key=lambda kv: max(kv[1]))
        print(f"layer {li:2d}  KL per step {[round(x, 4) for x in kl]}  worst step's head errors "
              f"{[round(x, 3) for x in worst[1]]}", flush=True)


if __name__ == "__main__":
    main()
