"""Two CPU ranks (torchrun, gloo) run the rollout engine's decode loop equally long on uneven work.

Each rank samples its own prompts with the scripted bigram model of tests/test_engine.py; alone, rank 0's
rows are done after 16 decode steps and rank 1's after 36. With ``reduce_max`` (what the trainer and eval
pass under torchrun) both ranks leave the loop at the same step (the later one) and draw exactly the tokens
they draw alone. Then the same with the model FSDP2-sharded and *not* gathered: every decode step is a
series of all-gathers, so unequal loops would hang (the launcher's timeout turns a hang into a failure).

The ranks end with ``lgrpo.distributed.close`` and check that it freed the process group before the
interpreter's finalization. A sharded model leaves the group referenced after ``destroy_process_group``;
its gloo workers then lived into finalization, where one that freed a collective's tensor aborted the
exit (SIGABRT, "terminate called without an active exception") now and then, after a passing body.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import weakref
from pathlib import Path

import pytest

from tests.launch import torchrun

# The rows of prompts [14, 15] end after 16 decode steps, those of [12, 13] after 36 (seed 0, G = 4,
# check_every 2): picked by running the engine alone; the test checks they still differ.
FIRST_PROMPT = {0: 14, 1: 12}


def run_rank(out: Path) -> None:
    import torch
    import torch.distributed as dist

    from lgrpo import distributed as D
    from lgrpo.rollout.engine import RolloutEngine
    from tests.test_engine import STOP, _scripted_lm, _text_prompts
    from tests.toy_task import char_tokenizer

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    tok = char_tokenizer()
    model = _scripted_lm(tok)
    prompts = _text_prompts(tok, ["pick 1:", "pick 2:"])
    kw = dict(seed=0, step=0, prompt_ids=torch.arange(2) + FIRST_PROMPT[rank])
    opts = dict(max_new_tokens=40, stop=STOP, check_every=2)

    engine = RolloutEngine(model, tok, **opts)
    alone = engine.generate(prompts, 4, **kw)
    steps_alone = engine.stats["steps"]
    together = engine.generate(prompts, 4, reduce_max=D.all_reduce_max, **kw)
    steps_together = engine.stats["steps"]

    D.shard(model)  # per block + root, as the trainer shards the policy; left sharded on purpose
    sharded = RolloutEngine(model, tok, **opts)
    on_shards = sharded.generate(prompts, 4, reduce_max=D.all_reduce_max, **kw)

    def same(a, b) -> bool:
        return (torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.completion_mask, b.completion_mask)
                and a.texts == b.texts)

    result = {"steps_alone": steps_alone, "steps_together": steps_together, "steps_sharded": sharded.stats["steps"],
              "same_together": same(alone, together), "same_sharded": same(alone, on_shards),
              "compactions": engine.stats["compactions"]}
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    # Registered before close(), so it runs after close()'s own atexit function (last in, first out),
    # just before finalization: the group must be gone by then, its worker threads joined.
    group = weakref.ref(dist.group.WORLD)
    atexit.register(lambda: (out / f"rank{rank}.exit.json").write_text(json.dumps({"freed": group() is None})))
    D.close()


@pytest.mark.slow
def test_engine_decode_loops_are_equal_across_ranks(tmp_path):
    proc = torchrun(__file__, str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["steps_alone"] < r1["steps_alone"], (r0, r1)  # uneven work, as intended
    longest = max(r0["steps_alone"], r1["steps_alone"])
    for r in (r0, r1):
        assert r["steps_together"] == r["steps_sharded"] == longest, r
        assert r["same_together"] and r["same_sharded"], r
    for r in (0, 1):  # no gloo thread left to race the interpreter's finalization
        assert json.loads((tmp_path / f"rank{r}.exit.json").read_text()) == {"freed": True}, r


if __name__ == "__main__":  # a rank under torchrun
    os.environ.setdefault("TRITON_INTERPRET", "0")
    run_rank(Path(sys.argv[1]))
