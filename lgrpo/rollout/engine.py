"""The rollout engine: G completions per prompt without transformers' ``generate``.

What it does differently from ``lgrpo.rollout.hf.generate`` (the ``--rollout.engine hf`` path, which
it reproduces token for token under greedy decoding):

- **Prefill once per prompt.** The P prompts (images included: the vision tower sees each image once)
  run through the model's own forward once; their keys/values are then copied G ways into a
  preallocated static cache (nanochat's ``KVCache.prefill`` pattern, :mod:`lgrpo.rollout.buffers`). Decode
  positions continue from each prompt's, as ``generate`` continues them (:mod:`lgrpo.positions`).
- **A fixed-shape decode step**: the static cache, the attention mask, the positions, the sampler and
  the stop test all live on the device, so one step is the same kernels every time. On CUDA it is
  captured in a CUDA graph per batch-size bucket (:mod:`lgrpo.rollout.graphs`) and replayed; on CPU it
  runs eagerly.
- **No host sync per token.** The host looks at the batch every ``check_every`` steps: it leaves the
  loop when every row is done and, when the live rows fit a smaller bucket, compacts them (their
  cache rows included) so that finished rows stop costing. Under data parallelism the "all done"
  decision is reduced over ranks (``reduce_max``) so every rank runs the same number of forwards.
- **Sampling** (:mod:`lgrpo.rollout.sampler`): the Triton Gumbel-max kernel over ``[B, V]`` (its PyTorch
  twin off CUDA), a pure function of (seed, step, row id, position) and the logits; banned ids (vision
  placeholders) never drawn; rows with no finite logit reported (``NonFiniteLogitsError``). With
  ``top_p < 1`` the hf path's fixed-point inverse-CDF sampler.
- **Stopping** (:mod:`lgrpo.rollout.stop`): EOS ids and the stop string as a token-level automaton, one
  gather per step.

The model is called through its own ``forward`` (:mod:`lgrpo.rollout.face`: no copied modeling code).

Limits: models whose layers use sliding-window attention are refused; the cache holds the G copies
of each prompt's keys/values (a block mask over one copy is the next step where memory matters).
"""

from __future__ import annotations

import weakref

import torch

from ..group import PromptBatch, Rollout
from ..prompts import stop_token_ids
from .buffers import DecodeBuffers
from .face import ModelFace, Prefill, StepCache, is_fsdp
from .graphs import DecodeGraphs, autocast_state, bucket_for, bucket_sizes, prompt_columns
from .result import finish_rollout, pad_token_id, sample_row_ids
from .sampler import NonFiniteLogitsError, SamplingMode, draw, key_tensor
from .stop import StopCriteria
from .top_p import counter_uniform


class RolloutEngine:
    """Completions of a batch of prompts: prefill once, fork the KV cache G ways, decode on the device.

    ``model``: a transformers causal (V)LM (Qwen2.5-VL, Qwen2, ...) with full attention.
    ``max_new_tokens``: the completion budget. ``stop``: a stop string (kept in the completion).
    ``eos_ids``: ids that end a completion (default: ``lgrpo.prompts.stop_token_ids``, as the hf path).
    ``cuda_graphs``: ``"auto"`` = on CUDA unless the model is FSDP-sharded (its hooks and gathered
    weights are not capture-safe); ``True``/``False`` force it.
    ``check_every``: decode steps between the host's looks at the batch (one device sync each).
    ``compact``: move live rows into a smaller bucket when they fit one.
    ``prompt_bucket``: prompt lengths are rounded up to a multiple of this in the cache (fewer
    distinct graph shapes); default with CUDA graphs: eight steps per octave
    (:func:`~lgrpo.rollout.graphs.prompt_columns`), else exact.

    The engine keeps its static cache and graphs between calls (:meth:`release` frees them).
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_new_tokens: int,
        stop: str | None = None,
        eos_ids=None,
        cuda_graphs: bool | str = "auto",
        check_every: int = 8,
        compact: bool = True,
        prompt_bucket: int | None = None,
    ):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if check_every < 1:
            raise ValueError(f"check_every must be >= 1, got {check_every}")
        if cuda_graphs not in (True, False, "auto"):
            raise ValueError(f"cuda_graphs must be True, False or 'auto', got {cuda_graphs!r}")
        if stop is not None and not stop:
            raise ValueError("stop must be None or a non-empty string")
        self._model, self.tokenizer = model, tokenizer  # engine_for holds it weakly (see there)
        self.face = ModelFace(model)
        self.max_new_tokens, self.stop = int(max_new_tokens), stop
        self.check_every, self.compact = int(check_every), bool(compact)
        self.cuda_graphs = cuda_graphs
        self.prompt_bucket = prompt_bucket
        self.eos_ids = sorted(stop_token_ids(tokenizer) if eos_ids is None else {int(i) for i in eos_ids})
        pad = pad_token_id(tokenizer)
        if pad is None:
            raise ValueError("the tokenizer has neither a pad token nor a stop token to pad with")
        self.pad_id = int(pad)
        self._criteria: StopCriteria | None = None
        self._buf: DecodeBuffers | None = None
        self._graphs = DecodeGraphs()
        self.stats: dict = {}  # the last call's numbers: steps, compactions, captures, capture_s

    # -- public -----------------------------------------------------------------------------------

    @property
    def model(self):
        model = self._model() if isinstance(self._model, weakref.ref) else self._model
        if model is None:
            raise ReferenceError("this rollout engine's model has been freed")
        return model

    @torch.no_grad()
    def generate(
        self,
        prompts: PromptBatch,
        group_size: int,
        *,
        greedy: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
        step: int = 0,
        prompt_ids: torch.Tensor | None = None,
        batch_size: int | None = None,
        reduce_max=None,
    ) -> Rollout:
        """``group_size`` completions of each of the P prompts; row ``i`` of the result is completion
        ``i % G`` of prompt ``i // G`` and is sampled with row id ``prompt_ids[i // G] * G + i % G``.

        ``prompts``: the un-repeated :class:`lgrpo.group.PromptBatch` (P rows, left padded, each row's
        images once).
        ``prompt_ids``: the prompts' global positions (default ``arange(P)``). ``greedy`` ignores
        temperature/top_p. ``batch_size``: at most this many rows (whole groups) per pass.
        ``reduce_max``: when several ranks generate together, a function taking the max of a tensor
        over ranks in place (``lgrpo.distributed.all_reduce_max``): every rank then runs the same number
        of forwards, leaving the loop when all ranks are done. Every rank must call with the same
        number of passes (prompts and ``batch_size``).
        The result holds ``prompts`` as given (not repeated) and ``group = arange(P).repeat_interleave(G)``,
        built by :func:`lgrpo.rollout.result.finish_rollout` as the hf path builds it.
        """
        n_prompts = self._check_args(prompts, group_size, temperature, top_p, batch_size)
        row_ids = sample_row_ids(prompt_ids, n_prompts, group_size)
        per_pass = n_prompts if batch_size is None else max(1, batch_size // group_size)
        was_training = self.model.training
        self.model.eval()
        self.stats = {"steps": 0, "compactions": 0, "captures": 0, "capture_s": 0.0, "passes": 0}
        parts = []
        try:
            for lo in range(0, n_prompts, per_pass):
                idx = list(range(lo, min(lo + per_pass, n_prompts)))
                part = prompts.select(idx) if per_pass < n_prompts else prompts
                parts.append(self._generate_pass(part, group_size, greedy, temperature, top_p, seed, step,
                                                 row_ids[idx[0] * group_size:(idx[-1] + 1) * group_size], reduce_max))
        finally:
            self.model.train(was_training)
        return self._rollout(prompts, group_size, parts)

    # -- one pass: prefill, fork, decode ----------------------------------------------------------

    def _generate_pass(self, prompts, group_size, greedy, temperature, top_p, seed, step, row_ids, reduce_max):
        self.stats["passes"] += 1
        mode = SamplingMode.of(greedy, temperature, top_p)
        pre = self.face.prefill(self.model, prompts)
        n_prompts, t = pre.attention_mask.shape
        rows = n_prompts * group_size
        b = bucket_for(rows)
        graphs = self._use_graphs(pre.logits.device)
        t_cap = prompt_columns(t, self.prompt_bucket, graphs)
        self._ensure_buffers(b, t_cap, pre)
        key = (t_cap, mode, autocast_state(pre.logits.device))
        if graphs:
            self._graphs.follow_weights(self.model)
            for nb in self._capture_plan(b):
                seconds = self._graphs.capture((nb,) + key, self._buf, lambda nb=nb: self._decode_step(nb, t_cap, mode),
                                               self.face.sdpa)
                if seconds is not None:
                    self.stats["captures"] += 1
                    self.stats["capture_s"] += seconds
        uniforms = (counter_uniform(seed, step, row_ids, torch.arange(self.max_new_tokens))
                    if mode.kind == "top_p" else None)
        s = self._buf
        s.begin(pre, group_size, b, t_cap, row_ids, self.pad_id, key=key_tensor(seed, step), temperature=temperature,
                uniforms=uniforms)
        first = pre.logits.index_select(0, s.prompt_of[:b])
        self._record(b, first, s.j, mode)  # completion token 0, from the prompts' last logits

        n_steps = self.max_new_tokens - 1
        for it in range(n_steps):
            if it % self.check_every == 0:
                alive = int((~s.done[:b]).sum())
                everyone = alive
                if reduce_max is not None:
                    everyone = int(reduce_max(torch.tensor([alive], device=s.done.device)).item())
                if everyone == 0:
                    break
                nb = bucket_for(alive)
                if self.compact and nb < b:
                    s.compact(b, nb)
                    self.stats["compactions"] += 1
                    b = nb
            if graphs:
                self._graphs.replay((b,) + key)
            else:
                with self.face.sdpa():
                    self._decode_step(b, t_cap, mode)
            self.stats["steps"] += 1
        return self._collect(rows, greedy, row_ids)

    def _capture_plan(self, b: int) -> list[int]:
        """The buckets to capture for a pass that starts with ``b`` slots: every bucket compaction can move
        to, largest first (one memory pool), or none when the pass has no decode step: with
        ``max_new_tokens`` 1 the only token comes from the prefill's logits, and a warm-up step would record
        token 1 into a 1-column buffer (an out-of-bounds write, a device assert on CUDA)."""
        if self.max_new_tokens < 2:
            return []
        return list(reversed(bucket_sizes(b) if self.compact else [b]))

    def _use_graphs(self, device: torch.device) -> bool:
        if self.cuda_graphs == "auto":
            return device.type == "cuda" and not is_fsdp(self.model)
        if self.cuda_graphs and device.type != "cuda":
            raise ValueError("cuda_graphs=True needs the model on a CUDA device")
        return bool(self.cuda_graphs)

    def _ensure_buffers(self, b: int, t_cap: int, pre: Prefill) -> None:
        length = t_cap + self.max_new_tokens
        if self._buf is not None and self._buf.fits(b, length, pre):
            return
        self._graphs.drop()  # graphs point into the old buffers
        self._buf = None
        vocab = pre.logits.shape[-1]
        if self._criteria is None or self._criteria.vocab_size != vocab:
            self._criteria = StopCriteria(self.tokenizer, vocab, self.eos_ids, self.stop)
        self._criteria.to(pre.kv[0][0].device)
        self._buf = DecodeBuffers.allocate(b, length, pre, self.max_new_tokens, self.pad_id, self.face.banned)

    # -- the device step ----------------------------------------------------------------------------

    def _decode_step(self, b: int, t_cap: int, mode: SamplingMode) -> None:
        """Feed each slot's last token, write its keys/values at column ``t_cap + j``, sample token
        ``j + 1`` and advance ``j``: device work only (capturable)."""
        s = self._buf
        j = s.j
        length = t_cap + self.max_new_tokens
        write = j + t_cap
        s.mask[:b].index_fill_(1, write, True)
        cache = StepCache([(k[:b, :, :length], v[:b, :, :length]) for k, v in s.kv], write, length)
        logits = self.face.decode(self.model, s.tokens[:b], s.next_pos[:b], j, s.mask[:b, :length], cache)
        self._record(b, logits, j + 1, mode)
        j.add_(1)

    def _record(self, b: int, logits: torch.Tensor, t: torch.Tensor, mode: SamplingMode) -> None:
        """Sample completion token ``t`` (a device scalar) of the first ``b`` slots and record it."""
        s = self._buf
        ids, empty = draw(mode, logits, t, key=s.key, row_ids=s.row_ids[:b], temperature=s.temperature,
                          banned=s.banned, uniforms=s.uniforms[:b])
        alive = ~s.done[:b]
        ids = torch.where(alive, ids, self.pad_id)
        orig = s.orig[:b]
        s.out.index_put_((orig, t.expand(b)), ids)
        s.bad.index_put_((orig,), s.bad.index_select(0, orig) | (empty & alive))
        state, stopped = self._criteria.step(s.stop_state[:b], ids)
        hit = alive & stopped
        s.stop_len.index_put_((orig,), torch.where(hit, t + 1, s.stop_len.index_select(0, orig)))
        s.done[:b] |= hit
        s.stop_state[:b].copy_(state)
        s.tokens[:b].copy_(ids)

    # -- host-side bookkeeping ----------------------------------------------------------------------

    def release(self) -> None:
        """Free the static cache, the buffers and the captured graphs (the next call rebuilds them)."""
        self._graphs.release()
        self._buf = None

    def _collect(self, rows: int, greedy: bool, row_ids: torch.Tensor):
        s = self._buf
        # copies: the buffers belong to the next pass (.cpu() of a CPU tensor would alias them)
        out = s.out[:rows].to("cpu", copy=True)
        stop_len = s.stop_len[:rows].to("cpu", copy=True)
        bad = s.bad[:rows].cpu()
        if bad.any() and not greedy:
            bad_rows = row_ids[bad].tolist()
            raise NonFiniteLogitsError(
                f"the policy's logits had no finite value (NaN or all -inf) while sampling rows {bad_rows[:8]}"
                f"{' ...' if len(bad_rows) > 8 else ''}: the model has diverged")
        return out, stop_len

    def _rollout(self, prompts: PromptBatch, group_size: int, parts: list) -> Rollout:
        outs = torch.cat([o for o, _ in parts])
        stop_len = torch.cat([sl for _, sl in parts])
        return finish_rollout(self.tokenizer, prompts, group_size, outs, stop_len, eos_ids=self.eos_ids,
                              meta={"engine": dict(self.stats)})

    def _check_args(self, prompts, group_size, temperature, top_p, batch_size) -> int:
        if not isinstance(prompts, PromptBatch):
            raise ValueError("prompts must be a lgrpo.group.PromptBatch (P rows, left padded), "
                             f"got {type(prompts).__name__}")
        if len(prompts) < 1:
            raise ValueError("prompts holds no rows")
        if not bool(prompts.attention_mask[:, -1].bool().all()):
            raise ValueError("prompts must be left padded (every row's last attention_mask entry 1)")
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        return len(prompts)


_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def engine_for(model, tokenizer, **kwargs) -> RolloutEngine:
    """One engine per (model, tokenizer, options), kept as long as the model lives: its static
    buffers and captured graphs are reused call after call, and freed with the model."""
    per_model = _ENGINES.setdefault(model, {})
    key = (id(tokenizer), repr(sorted(kwargs.items())))
    engine = per_model.get(key)
    if engine is None or engine.tokenizer is not tokenizer:
        engine = per_model[key] = RolloutEngine(model, tokenizer, **kwargs)
        # A weak dictionary's value must not reach its key: an engine holding its model would keep the
        # model, its static cache and its graph pool alive for the rest of the process.
        engine._model = weakref.ref(model)
    return engine
