"""Write requirements/lock.txt from a virtual environment in which the whole suite just passed.

``make lock`` runs the suite on the newest releases pyproject's ranges allow (``make test-latest``,
in .venv-latest) and, only when it passes, calls this with that venv's Python. The lock is used as
a pip constraints file by ``make test``/``make demo``/CI, so a fresh clone installs exactly these
versions. The torch stack (torch, triton, CUDA libraries) is left out: the Makefile installs it
from TORCH_SPEC, which differs between CPU machines and GPU hosts, and a pin here would fight it.

    python tools/lock.py VENV_PYTHON TORCH_SPEC > requirements/lock.txt
"""

import datetime
import re
import subprocess
import sys

# Installed from TORCH_SPEC, or the project itself.
NOT_LOCKED = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*|lgrpo)$", re.IGNORECASE)


def frozen(python: str) -> list[str]:
    out = subprocess.run([python, "-m", "pip", "freeze", "--all", "--exclude-editable"],
                         check=True, capture_output=True, text=True).stdout
    pins = []
    for line in out.splitlines():
        name, sep, version = line.partition("==")
        if not sep:
            raise SystemExit(f"lock: not a plain pin, cannot be locked: {line!r}")
        if not NOT_LOCKED.match(name.strip()):
            pins.append(f"{name.strip()}=={version.strip()}")
    return sorted(pins, key=str.lower)


def header(python: str, torch_spec: str) -> list[str]:
    info = subprocess.run([python, "-c", "import platform, torch; "
                           "print(platform.python_version(), platform.machine(), torch.__version__)"],
                          check=True, capture_output=True, text=True).stdout.split()
    today = datetime.datetime.now(datetime.UTC).date().isoformat()
    return [
        f"# lgrpo lock, written {today} by `make lock` after the whole suite passed on these versions",
        f"# (Python {info[0]}, {info[1]}, torch {info[2]} from TORCH_SPEC={torch_spec!r}, not pinned here).",
        "# Used as pip constraints by `make test`, `make demo` and CI; refresh with `make lock`.",
    ]


def main(argv: list[str]) -> None:
    if len(argv) != 3:
        raise SystemExit(__doc__)
    python, torch_spec = argv[1], argv[2]
    print("\n".join(header(python, torch_spec) + frozen(python)))


if __name__ == "__main__":
    main(sys.argv)
