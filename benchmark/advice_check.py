"""traineagle3.advise's predictions against served measurements: tau and speed-up per k.

    python -m benchmark.advice_check advise.json outputs/sweep_k [more sweeps ...] [--out DIR]

A folder holds one benchmark.sh result folder per k (`k<k>/compare.json`, as
benchmark/vllm/sweep_k.sh writes them).  Several folders (sweeps of the same prompts at other
times) are averaged per k: on a shared machine one sweep's speed-ups move by more than the
error being checked.  For each k and concurrency measured: predicted and served tau and
speed-up, and the speed-up's error (predicted / served - 1); then whether the advisor's
recommended k is the served best, or how far behind it is.  Writes advice_check.{md,json} in
--out (default: the first folder).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path


def measured(folder: Path) -> dict[tuple[int, int], dict]:
    """(k, concurrency) -> {tau, speedup} from each k<k>/compare.json."""
    out = {}
    for path in sorted(folder.glob("k*/compare.json")):
        if not (m := re.fullmatch(r"k(\d+)", path.parent.name)):
            continue
        for row in json.loads(path.read_text()):
            if row["server"] == "eagle3" and row.get("speedup") is not None:
                out[int(m[1]), row["concurrency"]] = {"tau": row["acceptance_length"], "speedup": row["speedup"]}
    return out


def averaged(sweeps: list[dict[tuple[int, int], dict]]) -> dict[tuple[int, int], dict]:
    """(k, concurrency) -> mean tau and speed-up over the sweeps that served it, and each sweep's speed-up."""
    out = {}
    for key in sorted(set().union(*sweeps)):
        runs = [s[key] for s in sweeps if key in s]
        out[key] = {
            "tau": sum(r["tau"] for r in runs) / len(runs),
            "speedup": sum(r["speedup"] for r in runs) / len(runs),
            "speedup_per_sweep": [r["speedup"] for r in runs],
        }
    return out


def check(advice: dict, served: dict[tuple[int, int], dict]) -> dict:
    predicted = {(r["k"], r["concurrency"]): r for r in advice["predictions"] if "k" in r}
    rows = []
    for (k, c), s in sorted(served.items()):
        if (p := predicted.get((k, c))) is None:
            continue
        rows.append(
            {"k": k, "concurrency": c, "tau_predicted": p["tau"], "tau_served": s["tau"]}
            | {"speedup_predicted": p["speedup"], "speedup_served": s["speedup"]}
            | {"speedup_per_sweep": s["speedup_per_sweep"]}
            | {"error": p["speedup"] / s["speedup"] - 1}
        )
    verdicts = {}
    for c in sorted({r["concurrency"] for r in rows}):
        mine = {r["k"]: r for r in rows if r["concurrency"] == c}
        best = max(mine.values(), key=lambda r: r["speedup_served"])
        rec = advice["recommendation"].get("vllm", {}).get("best", {}).get(str(c), {}).get("setting", "")
        k = int(rec.split("=")[1]) if rec.startswith("chain k=") else None
        verdicts[c] = {
            "recommended_k": k,
            "served_best_k": best["k"],
            "behind_best": None if k not in mine else 1 - mine[k]["speedup_served"] / best["speedup_served"],
        }
    return {"rows": rows, "recommendation": verdicts}


def table(result: dict) -> str:
    lines = [
        "| k | concurrency | tau predicted | tau served | speed-up predicted | speed-up served | error |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        runs = r["speedup_per_sweep"]
        per_sweep = f" ({' '.join(f'{x:.2f}' for x in runs)})" if len(runs) > 1 else ""
        lines.append(
            f"| {r['k']} | {r['concurrency']} | {r['tau_predicted']:.2f} | {r['tau_served']:.2f} | "
            f"{r['speedup_predicted']:.2f}x | {r['speedup_served']:.2f}x{per_sweep} | {r['error']:+.1%} |"
        )
    errors = [abs(r["error"]) for r in result["rows"]]
    if errors:
        lines += ["", f"largest speed-up error {max(errors):.1%}, mean {sum(errors) / len(errors):.1%}"]
    for c, v in result["recommendation"].items():
        behind = "not served" if v["behind_best"] is None else f"{v['behind_best']:.1%} behind the served best"
        lines.append(
            f"concurrency {c}: recommended k={v['recommended_k']}, served best k={v['served_best_k']} ({behind})"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("advice", type=Path, help="traineagle3.advise --out JSON")
    p.add_argument("folders", type=Path, nargs="+", help="sweep_k.sh's folders (k<k>/compare.json), averaged")
    p.add_argument("--out", type=Path, default=None, help="where advice_check.{md,json} go (default: the first folder)")
    a = p.parse_args(argv)
    sweeps = [measured(folder) for folder in a.folders]
    for folder, sweep in zip(a.folders, sweeps):
        if not sweep:
            print(f"error: no k<k>/compare.json with an EAGLE-3 row under {folder}", file=sys.stderr)
            return 1
    result = check(json.loads(a.advice.read_text()), averaged(sweeps))
    text = table(result)
    out = a.out or a.folders[0]
    out.mkdir(parents=True, exist_ok=True)
    (out / "advice_check.md").write_text(text + "\n")
    (out / "advice_check.json").write_text(json.dumps(result, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
