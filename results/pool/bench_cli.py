"""Before/after wall times of the pool commands a user runs, each in a fresh process, on copies of
the demo pool: `pool add` of one adapter, `route` of one prompt, and opening a RoutedLM over the
pool plus one 8-token generation. Two source trees are timed in turns, in one run (this machine is
noisy: compare the ratios).

    python results/pool/bench_cli.py --before /tmp/old --after . --rounds 3 > results/pool/bench_cli.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CLI = "import sys; from loraretriever.cli import main; sys.exit(main())"
OPEN = (
    "import sys; from loraretriever import RoutedLM; "
    "lm = RoutedLM.from_pretrained(None, pool_dir=sys.argv[1]); lm.generate(['The eye color of Chyna is'], max_new_tokens=8); lm.close()"
)


def timed(tree: Path, args: list[str], cwd: Path) -> float:
    env = {**os.environ, "PYTHONPATH": f"{tree / 'core'}:{tree}", "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{tree}: {args[1][:40]}... failed:\n{done.stderr[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", type=Path, required=True, help="A checkout of the code before the change.")
    parser.add_argument("--after", type=Path, default=ROOT)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    source = ROOT / "pools" / "bigbench"
    times: dict[str, dict[str, list[float]]] = {"before": {}, "after": {}}
    with tempfile.TemporaryDirectory() as scratch:
        for round_ in range(args.rounds):
            for label, tree in (("before", args.before.resolve()), ("after", args.after.resolve())):
                pool = Path(scratch) / f"{label}{round_}"
                shutil.copytree(source, pool, ignore=shutil.ignore_patterns("index", ".*"))
                card = Path(scratch) / "card.json"
                card.write_text(json.dumps({"samples": ["Change to past tense: I run home."]}))
                commands = {
                    "route": ["-c", CLI, "route", "--pool", str(pool), "The eye color of Chyna is"],
                    "pool_add": [
                        "-c",
                        CLI,
                        "pool",
                        "add",
                        "tense_v2",
                        str(source / "adapters" / "tense"),
                        "--card",
                        str(card),
                        "--pool",
                        str(pool),
                    ],
                    "open_and_generate": ["-c", OPEN, str(pool)],
                }
                for name, command in commands.items():
                    times[label].setdefault(name, []).append(timed(tree, command, Path(scratch)))
    result = {
        "benchmark": "pool commands, wall time of a fresh process (s), median of rounds",
        "rounds": args.rounds,
        "before": {k: round(statistics.median(v), 2) for k, v in times["before"].items()},
        "after": {k: round(statistics.median(v), 2) for k, v in times["after"].items()},
    }
    result["after_over_before"] = {k: round(result["after"][k] / result["before"][k], 3) for k in result["after"]}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
