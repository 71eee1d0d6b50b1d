"""What ``engine.keep_freed_memory`` saves on the CPU: one miniature training, with and without.

``engine.train`` asks glibc's ``malloc`` to keep freed memory when it trains on the CPU (the
docstring of ``keep_freed_memory`` says why). This script trains the same Table 2 miniature run
twice, each in a fresh process: once as ``train`` does, once with glibc's defaults (the call
replaced by a no-op). It prints each process's wall, user and kernel (sys) seconds, minor page
faults and peak memory (``resource.getrusage``), their ratios, and whether the two trainings'
logged losses are identical (they must be: only where the bytes live changes).

    python bench/cpu_malloc.py                              # r50_c5_roialign at 384 px, 20 iterations
    python bench/cpu_malloc.py --run r50_c4 --iters 30 --input-size 384

The wall-time ratio is only meaningful on an otherwise idle machine; the kernel time and the
page faults are the process's own, whatever else runs.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def child(mode: str, probe_args: list[str]) -> None:
    """Train once in this process and print one JSON line of its resource usage."""
    from mrcnn_edu import engine

    if mode == "glibc-default":
        engine.keep_freed_memory = lambda: False  # train looks it up here, at call time
    import miniature_probe

    tic = time.perf_counter()
    miniature_probe.main(probe_args)
    wall = time.perf_counter() - tic
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print("USAGE " + json.dumps({"mode": mode, "wall_s": wall, "user_s": usage.ru_utime,
                                 "sys_s": usage.ru_stime, "minor_faults": usage.ru_minflt,
                                 "max_rss_mb": usage.ru_maxrss / 1024}), flush=True)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="r50_c5_roialign", help="a Table 2 run (miniature_probe --run)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--input-size", type=int, default=None,
                        help="as ablate --input-size (default: the table's, 384 px)")
    parser.add_argument("--quick", action="store_true", help="the 64 px miniature (tests)")
    parser.add_argument("--data", default=None, help="dataset folder (default: the probe's)")
    parser.add_argument("--child", choices=["keep", "glibc-default"], help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    probe_args = ["--run", args.run, "--iters", str(args.iters), "--warmup", "1", "--no-eval",
                  "--threads", "1", "--seed", "0"]
    probe_args += ["--input-size", str(args.input_size)] if args.input_size else []
    probe_args += ["--quick"] if args.quick else []
    probe_args += ["--data", args.data] if args.data else []
    if args.child:
        child(args.child, probe_args + ["--out", args.out])
        return {}
    usage, losses = {}, {}
    with tempfile.TemporaryDirectory(prefix="cpu_malloc_") as tmp:
        for mode in ("glibc-default", "keep"):
            out = Path(tmp) / mode
            command = [sys.executable, __file__, "--child", mode, "--out", str(out),
                       *(argv if argv is not None else sys.argv[1:])]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"the {mode} child failed:\n{done.stderr[-3000:]}")
            line = [x for x in done.stdout.splitlines() if x.startswith("USAGE ")][-1]
            usage[mode] = json.loads(line[len("USAGE "):])
            losses[mode] = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    same = [{k: v for k, v in r.items() if k != "seconds_per_iter"} for r in losses["keep"]] == \
           [{k: v for k, v in r.items() if k != "seconds_per_iter"} for r in losses["glibc-default"]]
    size = f"{args.input_size} px" if args.input_size else "the table's input size"
    print(f"{args.run}, {args.iters} iterations at {size}, one thread, each in a fresh process")
    print(f"{'':16} {'wall s':>8} {'user s':>8} {'sys s':>8} {'minor faults':>13} {'peak MB':>8}")
    for mode in ("glibc-default", "keep"):
        u = usage[mode]
        print(f"{mode:16} {u['wall_s']:8.1f} {u['user_s']:8.1f} {u['sys_s']:8.1f} "
              f"{u['minor_faults']:13d} {u['max_rss_mb']:8.0f}")
    a, b = usage["glibc-default"], usage["keep"]
    ratios = {k: a[k] / max(b[k], 1e-9) for k in ("wall_s", "user_s", "sys_s", "minor_faults", "max_rss_mb")}
    print("default / keep: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    print(f"logged losses identical: {same} ({len(losses['keep'])} records each)")
    return {"usage": usage, "ratios": ratios, "same_losses": same, "records": len(losses["keep"])}


if __name__ == "__main__":
    main()
