"""Issue 6 benchmark: balance of the ownership plan on LLaMA-1B and LLaMA-7B shapes at 4-64 ranks.

For each model (projected matrices read from a meta-device build: no memory), world size and refresh cost model
(exact SVD ``m·n·min(m,n)``, randomized SVD ``m·n·(r+oversample)``) it reports the plan's max/mean refresh cost,
the bound LB/mean with ``LB = max(Σcost/N, largest cost, c_N + c_{N+1})``, max/LB, the true optimum over LB (exact
DP: these models have two distinct refresh costs) and plain LPT's max/LB for comparison. The target of the issue is
max ≤ 1.02·LB; where even the optimum misses it, the bound is unreachable with whole matrices.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.report import table, write_report  # noqa: E402
from qgalore_dist.parallel.plan import exact_max_cost, make_plan, model_matrix_shapes  # noqa: E402

MODELS = ("llama_1b", "llama_7b")
WORLDS = (4, 8, 16, 32, 64)
TARGET = 1.02


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rank", type=int, default=512, help="projection rank (rsvd sketch width, state bytes)")
    ap.add_argument("--oversample", type=int, default=8)
    ap.add_argument("--no-report", action="store_true", help="print only; do not touch docs/")
    args = ap.parse_args(argv)

    rows, records = [], []
    for model in MODELS:
        shapes = model_matrix_shapes(model)
        for projection in ("svd", "rsvd"):
            for world in WORLDS:
                t0 = time.perf_counter()
                plan = make_plan(shapes, world, rank=args.rank, projection=projection, oversample=args.oversample)
                seconds = time.perf_counter() - t0
                lpt = make_plan(shapes, world, rank=args.rank, projection=projection, oversample=args.oversample,
                                refine=False)
                lb = plan.lower_bound()
                mean = plan.mean_cost()
                opt = exact_max_cost(plan.costs.values(), world)
                rec = {"model": model, "projection": projection, "world_size": world, "matrices": len(shapes),
                       "max_over_mean": plan.balance(), "lb_over_mean": lb / mean, "max_over_lb": plan.balance_vs_lb(),
                       "opt_over_lb": opt / lb if opt is not None else None, "is_optimal": plan.max_cost() == opt,
                       "meets_target": plan.max_cost() <= TARGET * lb, "lpt_max_over_lb": lpt.balance_vs_lb(),
                       "state_max_over_mean": plan.state_balance(), "method": plan.method,
                       "plan_seconds": seconds}
                records.append(rec)
                f4 = lambda x: f"{x:.4f}"  # noqa: E731  (report.table's 4 significant digits print 1.0 as "1")
                rows.append([model, projection, world, f4(rec["max_over_mean"]), f4(rec["lb_over_mean"]),
                             f4(rec["max_over_lb"]), "yes" if rec["meets_target"] else "no",
                             f4(opt / lb) if opt is not None else "n/a", "yes" if rec["is_optimal"] else "no",
                             f4(rec["lpt_max_over_lb"]), f4(rec["state_max_over_mean"]), plan.method,
                             f"{1000 * seconds:.0f}"])

    headers = ["model", "cost", "N", "max/mean", "LB/mean", "max/LB", "≤ 1.02·LB", "opt/LB", "optimal",
               "plain LPT max/LB", "state max/mean", "method", "plan ms"]
    missed = [r for r in records if not r["meets_target"]]
    unreachable = [r for r in missed if r["opt_over_lb"] is not None and r["opt_over_lb"] > TARGET]
    notes = [
        f"Rank {args.rank}, oversample {args.oversample}; {sum(r['is_optimal'] for r in records)} of {len(records)} "
        f"plans are optimal (max = exact optimum), {len(records) - len(missed)} of {len(records)} meet "
        f"max ≤ {TARGET}·LB.",
    ]
    if unreachable:
        cases = ", ".join(f"{r['model']} {r['projection']} N={r['world_size']} (opt/LB {r['opt_over_lb']:.4f})"
                          for r in unreachable)
        notes.append(f"Missed only where LB itself is unreachable with whole matrices: {cases}. For llama_7b at 64 "
                     "ranks (128 attention blocks of cost a, 96 MLP blocks of 2.6875a) every load below 6.375a is "
                     "6a, 2.6875a + 3a or 5.375a, which together hold at most 96 attention blocks, so the optimum "
                     "is 6.375a against LB = Σ/64 = 6.03a.")
    markdown = table(headers, rows) + "\n\n" + "\n\n".join(notes)
    data = {"rank": args.rank, "oversample": args.oversample, "target": TARGET, "results": records}
    if args.no_report:
        print(markdown)
    else:
        write_report("bench_plan", "Ownership plan balance on LLaMA-1B / 7B shapes (issue 6)", data, markdown)


if __name__ == "__main__":
    main()
