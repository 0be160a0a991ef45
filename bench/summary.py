"""Print one short table of every benchmark JSON in a folder (the last thing gpu_check.sh prints)."""

import json
import sys
from pathlib import Path


def main(folder: str) -> None:
    files = sorted(Path(folder).glob("*.json"))
    if not files:
        print(f"no benchmark results in {folder}")
        return
    for path in files:
        data = json.loads(path.read_text())
        env = data.get("env", {})
        print(f"\n{data.get('title', path.stem)}  [{env.get('device', '?')}, torch {env.get('torch', '?')}]")
        for r in data.get("rows", []):
            ms = r.get("ms")
            t = f"{ms:9.3f} ms" if isinstance(ms, (int, float)) and ms == ms else "   failed  "
            ratio = f"{r['ratio']:6.2f}x" if r.get("ratio") is not None else "       "
            mem = f"{r['extra_gib']:6.2f} GiB" if r.get("extra_gib") is not None else ""
            print(f"  {r['name'][:46]:<46} {t} {ratio} {mem:>10}  {r.get('note', '')[:60]}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench_results")
