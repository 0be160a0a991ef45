"""The rollout engine (lgrpo.rollout.engine) against the transformers path it replaces (lgrpo.rollout.hf.generate):
greedy token for token on the tiny VLM and the text stand-in, stops where StopOnString stops, seeded
draws independent of the batch, the vision tower once per prompt, and the stop automaton."""

from __future__ import annotations

import gc
import random
import weakref
from contextlib import contextmanager

import pytest
import torch

from lgrpo.group import PromptBatch
from lgrpo.model import load_model, load_tokenizer
from lgrpo.rollout.engine import RolloutEngine, engine_for
from lgrpo.rollout.graphs import bucket_sizes, prompt_columns
from lgrpo.rollout.hf import StopOnString, clean_generation_config, generate
from lgrpo.rollout.sampler import NonFiniteLogitsError
from lgrpo.rollout.stop import StopCriteria, token_bytes
from tests.toy_task import TINY_FAMILIES, char_tokenizer, ragged_vl_batch, tiny_lm

STOP = "</answer>"


@pytest.fixture(scope="module")
def vlm():
    """The tiny Qwen2.5-VL and three prompts, two images each, of different sizes (4 to 16 visual tokens),
    left padded to different lengths."""
    return ragged_vl_batch("tiny")


@pytest.fixture(scope="module")
def toy():
    tok = char_tokenizer()
    model = tiny_lm(tok)
    clean_generation_config(model, tok)
    return model, tok, _text_prompts(tok, ["pick 1:", "pick 22:", "pick 1 or 2:"])


def _text_prompts(tok, texts, **kw) -> PromptBatch:
    enc = tok(texts, return_tensors="pt", padding=True, **kw)
    return PromptBatch(enc["input_ids"], enc["attention_mask"])


def _same(a, b):
    assert a.prompts is b.prompts and torch.equal(a.group, b.group)
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.equal(a.completion_mask, b.completion_mask)
    assert a.texts == b.texts and torch.equal(a.truncated, b.truncated)


def _hf(model, tok, prompts, group_size, **kw):
    """The transformers path: generate on the prompts repeated G times."""
    return generate(model, tok, prompts, group_size, **kw)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_greedy_equals_transformers_generate_on_the_vlm(vlm, family):
    """Token for token against generate(do_sample=False) on the prompts repeated G times, for each family;
    the vision tower runs once, on each prompt's images once (not G times)."""
    model, tok, prompts = vlm if family == "tiny" else ragged_vl_batch(family)
    seen = []
    visual = model.model.visual
    original = visual.forward

    def counting(hidden_states, *args, **kwargs):
        seen.append(hidden_states.shape[0])
        return original(hidden_states, *args, **kwargs)

    hf = _hf(model, tok, prompts, 3, max_new_tokens=20, stop=STOP, greedy=True)
    visual.forward = counting
    try:
        out = RolloutEngine(model, tok, max_new_tokens=20, stop=STOP).generate(prompts, 3, greedy=True)
    finally:
        visual.forward = original
    _same(out, hf)
    assert seen == [prompts.pixel_values.shape[0]]  # one call, each prompt's patches once
    # issue 12's layout: the prompts once, completion i of prompt i // G
    assert out.prompts is prompts and torch.equal(out.group, torch.arange(3).repeat_interleave(3))


def test_sampled_top_p_equals_transformers_on_the_vlm(vlm):
    """With top_p < 1 the engine samples with the hf path's own sampler: the same draws, so M-RoPE
    positions, the KV fork and the sampler's row ids must all line up exactly."""
    model, tok, prompts = vlm
    kw = dict(temperature=1.3, top_p=0.95, seed=11, step=4)
    hf = _hf(model, tok, prompts, 2, max_new_tokens=16, stop=STOP, prompt_ids=torch.arange(3) + 10, **kw)
    out = RolloutEngine(model, tok, max_new_tokens=16, stop=STOP).generate(
        prompts, 2, prompt_ids=torch.arange(3) + 10, **kw)
    _same(out, hf)
    assert len(set(out.texts)) > 3


def test_greedy_equals_transformers_generate_on_a_text_model(toy):
    model, tok, prompts = toy
    hf = _hf(model, tok, prompts, 3, max_new_tokens=12, stop=STOP, greedy=True)
    out = RolloutEngine(model, tok, max_new_tokens=12, stop=STOP, check_every=3).generate(prompts, 3, greedy=True)
    _same(out, hf)


def test_sampled_rollouts_are_reproducible_and_independent_of_the_batch(toy):
    """Gumbel-max draws keyed by (seed, step, row id, position): the same on every call, for a prompt
    alone or among others (its global position given), in chunks, with or without compaction."""
    model, tok, prompts = toy
    engine = RolloutEngine(model, tok, max_new_tokens=10, stop=STOP, check_every=1)
    kw = dict(seed=3, step=5)
    full = engine.generate(prompts, 4, **kw)
    assert len(set(full.texts)) > 6
    _same(full, engine.generate(prompts, 4, **kw))
    alone = engine.generate(prompts.select([1]), 4, prompt_ids=torch.tensor([1]), **kw)
    assert alone.texts == full.texts[4:8]
    chunked = engine.generate(prompts, 4, batch_size=4, **kw)
    assert chunked.texts == full.texts
    plain = RolloutEngine(model, tok, max_new_tokens=10, stop=STOP, compact=False).generate(prompts, 4, **kw)
    _same(plain, full)
    assert engine.generate(prompts, 4, seed=3, step=6).texts != full.texts
    other = engine.generate(prompts, 4, prompt_ids=torch.tensor([7, 8, 9]), **kw)
    assert other.texts != full.texts


def test_the_kernel_inside_the_engine(vlm, monkeypatch):
    """On CPU the engine samples with the kernel's PyTorch twin; the Triton kernel (interpreted here)
    in its place gives the same rollouts, sampled and greedy, with the VLM's banned ids."""
    from lgrpo.kernels import sampler

    import lgrpo.rollout.sampler as S

    model, tok, prompts = vlm
    engine = RolloutEngine(model, tok, max_new_tokens=5, stop=STOP)
    twin = [engine.generate(prompts, 2, seed=9), engine.generate(prompts, 2, greedy=True)]
    monkeypatch.setattr(S, "CPU_SAMPLER", sampler.sample_tokens)
    kernel = [engine.generate(prompts, 2, seed=9), engine.generate(prompts, 2, greedy=True)]
    for a, b in zip(twin, kernel):
        _same(a, b)


def _scripted_lm(tok):
    """A text model that is a bigram table: embeddings one-hot, every block's output projections zero,
    so the logits depend on the last token only. Paths from ':' lead to '</answer>', to a near miss
    ('answer>' without '</'), to EOS, or wander until max_new_tokens."""
    model = tiny_lm(tok, hidden=64)
    clean_generation_config(model, tok)
    vocab = len(tok)
    ids = tok.convert_tokens_to_ids
    table = torch.full((vocab, vocab), -30.0)  # [current, next] log-weights
    moves = {
        ":": {"<": 1.0, "a": 1.0, "z": 1.0},
        "<": {"/": 2.0, "a": 1.0},
        "/": {"a": 3.0, "z": 1.0},
        "a": {"n": 3.0, "z": 1.0},
        "n": {"s": 3.0, "<": 0.5},
        "s": {"w": 3.0, "z": 0.5},
        "w": {"e": 3.0},
        "e": {"r": 3.0},
        "r": {">": 3.0, "z": 1.0},
        ">": {"z": 1.0, "<eos>": 1.0, "<": 1.0},
        "z": {"z": 1.5, "<": 1.0, "<eos>": 0.5},
    }
    for cur, nxt in moves.items():
        for token, w in nxt.items():
            table[ids(cur), ids(token)] = w
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[:, :vocab] = torch.eye(vocab)
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[:, :vocab] = table.T / 8.0  # RMSNorm turns a one-hot into 8 x one-hot
    return model


def _host_stops(tok, completion_ids, max_new, eos_ids):
    """Where the hf path's host-side logic (StopOnString, then the first EOS) ends each row."""
    n, width = completion_ids.shape
    prompt = torch.zeros(n, 1, dtype=torch.long)
    stopper = StopOnString(tok, STOP, prompt_len=1)
    padded = torch.nn.functional.pad(completion_ids, (0, max_new - width), value=tok.pad_token_id)
    for t in range(1, max_new + 1):
        stopper(torch.cat([prompt, padded[:, :t]], 1), None)
    mask = torch.ones(n, max_new, dtype=torch.bool)
    truncated = torch.ones(n, dtype=torch.bool)
    for i, row in enumerate(padded.tolist()):
        ends = [k + 1 for k, token in enumerate(row) if token in eos_ids][:1]
        ends += [int(stopper.stop_len[i])] if stopper.stop_len[i] >= 0 else []
        if ends:
            mask[i, min(ends):] = False
            truncated[i] = False
    return mask, truncated


def test_eos_and_the_stop_string_end_rows_where_the_transformers_path_does():
    tok = char_tokenizer()
    model = _scripted_lm(tok)
    prompts = _text_prompts(tok, ["pick 1:", "pick 2:"])
    engine = RolloutEngine(model, tok, max_new_tokens=14, stop=STOP, check_every=2)
    # top_p < 1: the hf path's sampler, so every row's draws and stops can be compared one to one
    kw = dict(temperature=1.0, top_p=0.99, seed=2, step=0)
    hf = _hf(model, tok, prompts, 16, max_new_tokens=14, stop=STOP, **kw)
    out = engine.generate(prompts, 16, **kw)
    _same(out, hf)
    texts = out.texts
    assert any(t.endswith(STOP) for t in texts) and any("answer>" in t and STOP not in t for t in texts)
    assert out.truncated.any() and not out.truncated.all()
    eos_rows = [i for i in range(32) if not out.truncated[i] and not texts[i].endswith(STOP)]
    assert eos_rows and all(out.completion_ids[i, out.lengths[i] - 1] == tok.eos_token_id for i in eos_rows)
    # Gumbel-max draws: the rows end where the host-side logic says they end
    for seed in range(3):
        out = engine.generate(prompts, 16, seed=seed)
        mask, truncated = _host_stops(tok, out.completion_ids, 14, {tok.eos_token_id})
        assert torch.equal(out.completion_mask, mask[:, : out.completion_mask.shape[1]])
        assert torch.equal(out.truncated, truncated) and mask[:, out.completion_mask.shape[1]:].sum() == 0


def _stop_sequences(tok, stop: str, n: int, length: int, rng: random.Random) -> torch.Tensor:
    """Token sequences rich in the stop string split every way the vocabulary allows, glued to its
    neighbours ('.' + '</' -> '.</', '>' + '<' -> '><'), cut short (near misses), or random tokens."""
    vocab = len(tok)
    by_bytes = {}
    for i, b in enumerate(token_bytes(tok, vocab)):
        by_bytes.setdefault(b, i)

    def segment(data: bytes) -> list[int]:
        out, i = [], 0
        while i < len(data):
            options = [data[i:j] for j in range(i + 1, min(len(data), i + 20) + 1) if data[i:j] in by_bytes]
            piece = rng.choice(options)
            out.append(by_bytes[piece])
            i += len(piece)
        return out

    s = stop.encode()
    around = [b"", b".", b"<", b">", b"the", b" ", b"/", b"a", "é".encode()]
    seqs = []
    for _ in range(n):
        seq = []
        while len(seq) < length:
            r = rng.random()
            if r < 0.2:
                seq += segment(rng.choice(around) + s + rng.choice(around))
            elif r < 0.5:
                seq += segment(s[: rng.randrange(1, len(s))])
            elif r < 0.8:
                seq += segment(s[rng.randrange(1, len(s)):])
            else:
                seq.append(rng.randrange(vocab))
        seqs.append(seq[:length])
    return torch.tensor(seqs)


@pytest.mark.parametrize("stop", [STOP, "é>", "s></"])
def test_stop_automaton_equals_decoding_the_tail(stop):
    """Random token sequences of the tiny byte-level BPE vocabulary built around the stop string: the
    automaton stops at the token where StopOnString (decode the tail, then ``stop in text``) stops."""
    tok = load_tokenizer("tiny")
    n, length = 96, 20
    seqs = _stop_sequences(tok, stop, n, length, random.Random(0))
    crit = StopCriteria(tok, len(tok), [], stop)
    stopper = StopOnString(tok, stop, prompt_len=0)
    state = torch.zeros(n, dtype=torch.long)
    device_stop = torch.full((n,), -1)
    for t in range(length):
        stopper(seqs[:, : t + 1], None)
        state, hit = crit.step(state, seqs[:, t])
        device_stop = torch.where(hit & (device_stop < 0), t + 1, device_stop)
    assert torch.equal(device_stop, stopper.stop_len)
    assert (device_stop > 0).sum() >= 20 and (device_stop < 0).sum() >= 1


def test_nonfinite_logits_are_reported(toy):
    _, tok, prompts = toy
    model = tiny_lm(tok)
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    engine = RolloutEngine(model, tok, max_new_tokens=3)
    with pytest.raises(NonFiniteLogitsError, match=r"rows \[0, 1, 2, 3, 4, 5"):
        engine.generate(prompts, 2)
    assert engine.generate(prompts, 2, greedy=True).completion_ids.shape[0] == 6  # greedy does not check


def test_bad_arguments_are_rejected(toy):
    model, tok, prompts = toy
    engine = RolloutEngine(model, tok, max_new_tokens=3)
    right_padded = _text_prompts(tok, ["pick 1:", "pick 22:"], padding_side="right")
    for kwargs, match in [
        (dict(prompts=prompts, group_size=0), "group_size"),
        (dict(prompts=prompts, group_size=2, temperature=0.0), "temperature"),
        (dict(prompts=prompts, group_size=2, top_p=1.5), "top_p"),
        (dict(prompts=prompts, group_size=2, prompt_ids=torch.arange(2)), "prompt_ids"),
        (dict(prompts=prompts, group_size=2, batch_size=0), "batch_size"),
        (dict(prompts={"input_ids": prompts.input_ids}, group_size=2), "PromptBatch"),
        (dict(prompts=right_padded, group_size=2), "left padded"),
    ]:
        with pytest.raises(ValueError, match=match):
            engine.generate(**kwargs)
    for kwargs, match in [(dict(max_new_tokens=0), "max_new_tokens"), (dict(max_new_tokens=2, stop=""), "stop"),
                          (dict(max_new_tokens=2, cuda_graphs="yes"), "cuda_graphs"),
                          (dict(max_new_tokens=2, check_every=0), "check_every")]:
        with pytest.raises(ValueError, match=match):
            RolloutEngine(model, tok, **kwargs)
    with pytest.raises(ValueError, match="cuda_graphs"):
        RolloutEngine(model, tok, max_new_tokens=2, cuda_graphs=True).generate(prompts, 2)


def test_buckets_and_the_engine_cache(toy):
    assert bucket_sizes(1) == [1] and bucket_sizes(5) == [1, 2, 4, 8]
    assert bucket_sizes(17) == [1, 2, 4, 8, 16, 32] and bucket_sizes(48)[-3:] == [16, 32, 48]
    model, tok, _ = toy
    a = engine_for(model, tok, max_new_tokens=4, stop=STOP)
    assert engine_for(model, tok, max_new_tokens=4, stop=STOP) is a
    assert engine_for(model, tok, max_new_tokens=5, stop=STOP) is not a


def test_switching_the_rollout_path_on_resume_is_a_config_change():
    """The two paths draw different samples: a run resumed on the other one is another run (refused
    unless --run.allow_config_change), unlike the free-to-change options."""
    from lgrpo.config import build_config
    from lgrpo.preflight import FREE_TO_CHANGE, config_changes

    old, new = build_config("tiny", {}).to_dict(), build_config("tiny", {"rollout": {"engine": "hf"}}).to_dict()
    assert old["rollout"]["engine"] == "engine" and "rollout.engine" not in FREE_TO_CHANGE
    assert config_changes(old, new) == ["rollout.engine: 'engine' -> 'hf'"]
    # A run folder written before the option existed rolled out through transformers: resuming it on
    # the engine is the same change, and on the hf path none.
    del old["rollout"]["engine"]
    assert config_changes(old, build_config("tiny", {}).to_dict()) == ["rollout.engine: 'hf' -> 'engine'"]
    assert config_changes(old, new) == []


def test_bench_rollout_smoke(run_bench):
    """bench/bench_rollout.py at smoke sizes: the engine beside transformers' generate on the tiny VLM."""
    data = run_bench("bench_rollout", "bench_rollout")
    names = [r["name"] for r in data["rows"]]
    assert [n.split(",")[0] for n in names] == ["engine", "hf do_sample", "--rollout.engine hf"]
    assert all(r["extra"]["tok_s"] > 0 for r in data["rows"]), data["rows"]
    assert data["same_greedy_tokens"] is True


# --- the graph path on CPU: torch.cuda's capture calls stood in for -----------------------------------------


class _FakeGraphs:
    """torch.cuda's stream and graph calls for RolloutEngine._graph on CPU. The warm-up and the "captured"
    step run eagerly, as they would run on the device; what each saw of autocast is recorded; a replay runs
    the captured step's arguments eagerly again. What this cannot show (the kernels a real capture
    records) the GPU-marked tests below check."""

    def __init__(self, monkeypatch):
        self.seen = []  # (phase, autocast enabled, dtype, cache enabled) at each step of _graph
        self.capturing = None
        self.phase = None
        fake = self

        class Graph:
            def __init__(self):
                self.step = None

            def replay(self):
                engine, args = self.step
                with engine.face.sdpa():
                    real_step(engine, *args)

        @contextmanager
        def graph(g, pool=None):
            fake.capturing, fake.phase = g, "capture"
            try:
                yield
            finally:
                fake.capturing, fake.phase = None, None

        @contextmanager
        def stream(_):
            fake.phase = "warm-up"
            try:
                yield
            finally:
                fake.phase = None

        class Stream:
            def __init__(self, device=None):
                pass

            def wait_stream(self, other):
                pass

        real_step = RolloutEngine._decode_step

        def step(engine, *args):
            if fake.phase is not None:
                fake.seen.append((fake.phase, torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"),
                                  torch.is_autocast_cache_enabled()))
            if fake.capturing is not None:
                fake.capturing.step = (engine, args)
            return real_step(engine, *args)

        for name, value in (("Stream", Stream), ("stream", stream), ("current_stream", lambda device=None: Stream()),
                            ("graph_pool_handle", lambda: object()), ("CUDAGraph", Graph), ("graph", graph),
                            ("synchronize", lambda device=None: None)):
            monkeypatch.setattr(torch.cuda, name, value)
        monkeypatch.setattr(RolloutEngine, "_decode_step", step)

    @staticmethod
    def on(engine: RolloutEngine) -> RolloutEngine:
        engine._use_graphs = lambda device: True  # this engine only: the graph path, on the CPU
        return engine


@pytest.fixture
def fake_graphs(monkeypatch):
    return _FakeGraphs(monkeypatch)


def test_graphs_are_captured_without_the_autocast_cache(toy, fake_graphs):
    """Under eval's autocast (fp32 weights, bf16 compute) the capture runs in bf16 with autocast's weight
    cache off: with it on, the prefill's cached bf16 copies would be what the graph reads, freed when the
    autocast block ends, and every later replay (next eval batch, the eval after training) would read
    stale weights or freed memory."""
    model, tok, prompts = toy
    kw = dict(max_new_tokens=6, stop=STOP, check_every=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        graphs = _FakeGraphs.on(RolloutEngine(model, tok, **kw)).generate(prompts, 2, greedy=True)
        eager = RolloutEngine(model, tok, **kw).generate(prompts, 2, greedy=True)
    phases = [s[0] for s in fake_graphs.seen]
    assert phases.count("capture") == len(bucket_sizes(6)) == phases.count("warm-up"), phases
    assert set(fake_graphs.seen) == {(p, True, torch.bfloat16, False) for p in ("warm-up", "capture")}
    _same(graphs, eager)
    fake_graphs.seen.clear()
    _FakeGraphs.on(RolloutEngine(model, tok, **kw)).generate(prompts, 2, greedy=True)  # no autocast: none made
    assert {s[1] for s in fake_graphs.seen} == {False} and {s[3] for s in fake_graphs.seen} == {True}


@pytest.mark.parametrize("compact", [True, False])
def test_one_new_token_captures_no_graph(toy, fake_graphs, compact):
    """``max_new_tokens`` 1: the only token comes from the prefill, so there is no decode step to capture;
    a warm-up step would write token 1 into the 1-column output buffer (a device assert on CUDA, an
    IndexError here)."""
    model, tok, prompts = toy
    engine = _FakeGraphs.on(RolloutEngine(model, tok, max_new_tokens=1, compact=compact))
    out = engine.generate(prompts, 2, greedy=True)
    assert engine.stats["captures"] == 0 and not fake_graphs.seen and engine._capture_plan(8) == []
    _same(out, RolloutEngine(model, tok, max_new_tokens=1).generate(prompts, 2, greedy=True))
    assert out.completion_ids.shape == (6, 1)
    two = RolloutEngine(model, tok, max_new_tokens=2, compact=compact)
    assert two._capture_plan(8) == ([8, 4, 2, 1] if compact else [8])  # largest first, one pool


def test_engine_for_frees_its_engine_with_the_model(toy):
    """engine_for's engines are kept as long as their model lives, not longer: the engine (the weak
    dictionary's value) must not hold the model (its key), or the model, its static cache and its graph
    pool are never freed."""
    _, tok, prompts = toy
    model = tiny_lm(tok, seed=3)
    clean_generation_config(model, tok)
    engine = engine_for(model, tok, max_new_tokens=3)
    engine.generate(prompts, 2, greedy=True)
    refs = [weakref.ref(x) for x in (model, engine, engine._buf.kv[0][0])]
    del model, engine
    gc.collect()
    assert [r() for r in refs] == [None, None, None]


def test_prompt_columns_with_graphs_are_coarse_but_close():
    """With CUDA graphs each distinct prompt length in the cache is ~20 captures: eight per octave, never
    more than an eighth of padding (64 below 512 tokens); exact without graphs; a given bucket wins."""
    assert [prompt_columns(t, None, False) for t in (1, 77, 3000)] == [1, 77, 3000]
    assert [prompt_columns(t, 16, True) for t in (1, 77)] == [16, 80]
    caps = {t: prompt_columns(t, None, True) for t in range(1, 20000)}
    assert all(c >= t and c % 64 == 0 and (c - t < 64 or (c - t) * 8 <= t) for t, c in caps.items())
    assert len({caps[t] for t in range(2049, 4097)}) == 8 and caps[2900] == 3072
    assert len({caps[t] for t in range(1, 513)}) == 8  # multiples of 64 up to 512


# --- GPU: the captured graph replays what the eager step computes ---------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_graphs_replay_the_eager_step(vlm, dtype, monkeypatch):
    """CUDA graphs (one per bucket, compaction between them) give the eager engine's tokens, greedy and
    sampled, on the tiny VLM with two images per prompt; greedy in fp32 equals transformers' generate."""
    import lgrpo.kernels._common as common

    monkeypatch.setattr(common, "INTERPRET", False)  # the compiled kernel, not the twin
    _, tok, prompts = vlm
    model = load_model("tiny", seed=0, dtype=dtype, device="cuda")
    clean_generation_config(model, tok)
    prompts = prompts.to("cuda")
    # the same cache layout for both (prompt_bucket), so the same kernels see the same shapes
    kw = dict(max_new_tokens=24, stop=STOP, check_every=2, prompt_bucket=64)
    graphs = RolloutEngine(model, tok, cuda_graphs=True, **kw)
    eager = RolloutEngine(model, tok, cuda_graphs=False, **kw)
    results = {}
    for name, sampling in (("greedy", dict(greedy=True)), ("sample", dict(seed=1, step=2)),
                           ("top_p", dict(seed=1, step=3, top_p=0.9, temperature=1.2))):
        a, b = graphs.generate(prompts, 8, **sampling), eager.generate(prompts, 8, **sampling)
        _same(a, b)
        assert graphs.stats["captures"] == len(bucket_sizes(24)), graphs.stats  # every bucket, largest first
        assert graphs.stats["steps"] == eager.stats["steps"] > 0
        results[name] = a
    assert graphs.stats["capture_s"] < 30
    _same(graphs.generate(prompts, 8, seed=1, step=2), results["sample"])  # the graphs, replayed again
    assert graphs.stats["captures"] == 0
    with torch.no_grad():  # weights changed in place (as the optimizer does): the replay sees them
        model.lm_head.weight.mul_(-1.0)
    _same(graphs.generate(prompts, 8, greedy=True), eager.generate(prompts, 8, greedy=True))
    assert graphs.stats["captures"] == 0
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)
    if dtype == torch.float32:  # in bf16 generate's attention kernels differ in the last bits
        hf = _hf(model, tok, prompts, 8, max_new_tokens=24, stop=STOP, greedy=True)
        _same(RolloutEngine(model, tok, max_new_tokens=24, stop=STOP).generate(prompts, 8, greedy=True), hf)


@pytest.mark.gpu
def test_gpu_compaction_and_stops(monkeypatch):
    """The scripted text model on CUDA: rows stop at different steps, the batch compacts into smaller
    buckets between graph replays, and graphs == eager == the host-side stop logic."""
    import lgrpo.kernels._common as common

    monkeypatch.setattr(common, "INTERPRET", False)
    tok = char_tokenizer()
    model = _scripted_lm(tok).cuda()
    prompts = _text_prompts(tok, ["pick 1:", "pick 2:"]).to("cuda")
    kw = dict(max_new_tokens=40, stop=STOP, check_every=2, prompt_bucket=64)
    graphs = RolloutEngine(model, tok, cuda_graphs=True, **kw)
    eager = RolloutEngine(model, tok, cuda_graphs=False, **kw)
    a, b = graphs.generate(prompts, 24, seed=4), eager.generate(prompts, 24, seed=4)
    _same(a, b)
    assert graphs.stats["compactions"] >= 1 and graphs.stats["compactions"] == eager.stats["compactions"]
    mask, truncated = _host_stops(tok, a.completion_ids.cpu(), 40, {tok.eos_token_id})
    assert torch.equal(a.completion_mask.cpu(), mask[:, : a.completion_mask.shape[1]])
    assert torch.equal(a.truncated, truncated)
