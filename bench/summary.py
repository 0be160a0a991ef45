"""Print one short table of every benchmark JSON in a folder (the last thing gpu_check.sh prints).

The bench_*.py scripts' JSON files first, then `pytest bench --benchmark-only`'s (pytest_benchmark.json,
pytest-benchmark's own format), when the folder has one.
"""

import json
import sys
from pathlib import Path

PYTEST_JSON = "pytest_benchmark.json"


def pytest_benchmark_table(path: str | Path) -> str:
    """One line per benchmark of a ``--benchmark-json`` file, grouped by kernel: median time, x floor, the
    agreement with the fp64 reference (bench/test_kernels_benchmark.py's extra_info). A missing or
    unreadable file gives a line that says so, never an exception: the table is printed after everything
    else, and a timed-out run must not hide what the other steps measured."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        benchmarks = data["benchmarks"]
    except (OSError, ValueError, KeyError) as exc:
        return f"no pytest-benchmark results in {path} ({type(exc).__name__})"
    if not benchmarks:
        return f"no pytest-benchmark results in {path} (no benchmark ran)"
    info0 = benchmarks[0].get("extra_info", {})
    lines = [f"pytest bench --benchmark-only  [{info0.get('device', '?')}, torch {info0.get('torch', '?')}]",
             f"  {'group':<32} {'impl':<13} {'median':>12} {'x floor':>8}  agreement with fp64"]
    for b in sorted(benchmarks, key=lambda b: (b.get("group") or "", b["stats"]["median"])):
        info = b.get("extra_info", {})
        impl = (b.get("params") or {}).get("impl", b.get("param") or b["name"])
        median_ms = b["stats"]["median"] * 1e3
        x_floor = f"{info['x_floor']:7.2f}x" if isinstance(info.get("x_floor"), (int, float)) else ""
        lines.append(f"  {(b.get('group') or '')[:32]:<32} {impl[:13]:<13} {median_ms:9.3f} ms {x_floor:>8}  "
                     f"{info.get('agreement', '')[:80]}")
    return "\n".join(lines)


def main(folder: str) -> None:
    files = sorted(p for p in Path(folder).glob("*.json") if p.name != PYTEST_JSON)
    if not files:
        print(f"no benchmark results in {folder}")
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
    print()
    print(pytest_benchmark_table(Path(folder) / PYTEST_JSON))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench_results")
