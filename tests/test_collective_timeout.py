"""A stalled rank stops the run within --parallel.timeout_s, and the error names the phase it stalled in."""

import os
import sys
import time
from pathlib import Path

from tests.launch import torchrun


def test_a_stalled_rank_times_out_naming_the_phase(tmp_path):
    start = time.monotonic()
    out = torchrun(__file__, str(tmp_path), timeout=120)
    assert out.returncode != 0, out.stdout[-2000:]
    notes = [p.read_text() for p in sorted(tmp_path.glob("rank*.err"))]
    assert notes and any("timed out in the rollout phase" in n for n in notes), (notes, out.stderr[-3000:])
    assert time.monotonic() - start < 90  # the 20 s bound, not torch's default 30 minutes


if __name__ == "__main__":  # rank 1 stalls in the rollout phase; rank 0 waits there for it
    import traceback

    import torch

    from lgrpo import distributed as D
    from lgrpo.metrics import Timer

    # 20 s: also the bound on the ranks' start-up skew (the rendezvous and the first collective share it).
    dist = D.init("cpu", "gloo", timeout_s=20)
    rank = int(os.environ["RANK"])
    torch.distributed.all_reduce(torch.ones(1))  # both ranks are up: only the stall below can time out
    try:
        with Timer().phase("rollout"):
            if rank == 1:
                time.sleep(80)
            torch.distributed.all_reduce(torch.ones(1))
    except RuntimeError:
        (Path(sys.argv[1]) / f"rank{rank}.err").write_text(traceback.format_exc())
        os._exit(1)  # a clean teardown would wait for the stalled rank again
    os._exit(0)
