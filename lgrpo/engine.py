"""The rollout engine: G completions per prompt without transformers' ``generate``.

What it does differently from ``lgrpo.rollout.generate`` (the ``--rollout.engine hf`` path, which
it reproduces token for token under greedy decoding):

- **Prefill once per prompt.** The P prompts (images included: the vision tower sees each image once)
  run through the model's own forward once; their keys/values are then copied G ways into a
  preallocated static cache (nanochat's ``KVCache.prefill`` pattern). M-RoPE decode positions continue
  from each prompt's last position, as ``generate`` continues them (``rope_deltas``).
- **A fixed-shape decode step**: the static cache, the attention mask, the positions, the sampler and
  the stop test all live on the device, so one step is the same kernels every time. On CUDA it is
  captured in a CUDA graph per batch-size bucket (nano-vllm's ``model_runner`` pattern: static input
  buffers, one memory pool, largest bucket first, prefill left eager) and replayed; on CPU it runs eagerly.
- **No host sync per token.** The host looks at the batch every ``check_every`` steps: it leaves the
  loop when every row is done and, when the live rows fit a smaller bucket, compacts them (their
  cache rows included) so that finished rows stop costing. Under data parallelism the "all done"
  decision is reduced over ranks (``reduce_max``) so every rank runs the same number of forwards.
- **Sampling** (``lgrpo.kernels.sampler``): one Triton kernel over ``[B, V]``, Gumbel-max with Philox
  noise, a pure function of (seed, step, row id, position) and the logits; banned ids (vision
  placeholders) never drawn; rows with no finite logit reported (``NonFiniteLogitsError``). With
  ``top_p < 1`` the fixed-point inverse-CDF sampler of ``lgrpo.sampling`` runs instead (the hf path's
  sampler: the same tokens as that path, up to floating-point differences in the logits).
- **Stopping** (``lgrpo.stop``): EOS ids and the stop string as a token-level automaton, one gather
  per step.

The model is called through its own ``forward`` (no copied modeling code): decode steps pass a
prepared attention mask (transformers accepts a ``{layer type: mask}`` dict and then builds none), the
positions, and a small cache object whose ``update`` writes the step's keys/values into the static
cache at the step's column. Decode attention runs as SDPA whatever the model's prefill attention is.

Limits: models whose layers use sliding-window attention are refused; the cache holds the G copies
of each prompt's keys/values (a block mask over one copy is the next step where memory matters).
"""

from __future__ import annotations

import inspect
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from .group import PromptBatch, Rollout
from .kernels import reference as _reference
from .kernels.sampler import key_tensor, sample_tokens
from .prompts import stop_token_ids
from .rollout import finish_rollout, pad_token_id, sample_row_ids
from .sampling import NonFiniteLogitsError, counter_uniform, placeholder_token_ids, sample_from_logits
from .stop import StopCriteria

# Off CUDA the sampler's PyTorch twin runs (the same ids as the kernel; the Triton interpreter, which
# TRITON_INTERPRET=1 would otherwise route a CPU launch to, is for testing the kernel, not for decoding).
CPU_SAMPLER = _reference.sample_tokens

SMALL_BUCKETS = (1, 2, 4, 8)
BUCKET_STEP = 16  # buckets above 8 rows: multiples of 16


def bucket_sizes(max_rows: int) -> list[int]:
    """Batch-size buckets up to the first one >= ``max_rows``: 1, 2, 4, 8, 16, 32, 48, ..."""
    sizes = []
    for b in SMALL_BUCKETS:
        sizes.append(b)
        if b >= max_rows:
            return sizes
    b = BUCKET_STEP
    while True:
        sizes.append(b)
        if b >= max_rows:
            return sizes
        b += BUCKET_STEP


def bucket_for(rows: int) -> int:
    return bucket_sizes(max(rows, 1))[-1]


# --- talking to the model --------------------------------------------------------------------------


class _StepCache:
    """The cache a decode step hands the model: each layer's ``update`` writes the step's keys/values
    at column ``write`` of the static cache and returns the whole (fixed-length) cache."""

    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor]], write: torch.Tensor, length: int):
        self.layers_kv, self.write, self.length = layers, write, length

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k, v = self.layers_kv[layer_idx]
        k.index_copy_(2, self.write, key_states.to(k.dtype))
        v.index_copy_(2, self.write, value_states.to(v.dtype))
        return k, v

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def __len__(self) -> int:
        return len(self.layers_kv)


def _cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (keys, values) ``[B, kv heads, T, head dim]`` of a transformers cache."""
    if hasattr(cache, "layers"):  # transformers >= 4.56
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache))
    return [(cache[i][0], cache[i][1]) for i in range(len(cache))]


class _ModelFace:
    """What the engine needs to know about a transformers causal (V)LM."""

    def __init__(self, model):
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        core = getattr(model, "model", None)
        self.rope = core if hasattr(core, "get_rope_index") else None  # M-RoPE (Qwen2-VL family)
        config = model.config
        self.text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        types = getattr(self.text_config, "layer_types", None) or ["full_attention"]
        if any(t != "full_attention" for t in types) or getattr(self.text_config, "use_sliding_window", False):
            raise ValueError("the rollout engine supports full-attention layers only (this model has "
                             f"{sorted(set(types))}); use --rollout.engine hf")
        self.layer_types = sorted(set(types))
        self.banned = placeholder_token_ids(config)
        # every config object an attention module may read its implementation from
        configs = {id(c): c for c in (config, self.text_config)}
        for m in model.modules():
            c = getattr(m, "config", None)
            if c is not None and hasattr(c, "_attn_implementation_internal"):
                configs[id(c)] = c
        self._configs = [c for c in configs.values() if hasattr(c, "_attn_implementation_internal")]

    @property
    def rope_dims(self) -> int:
        return 3 if self.rope is not None else 1

    def prefill_positions(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Position ids for the prompt forward (as ``generate`` builds them) and each row's next
        position ``[P, rope_dims]``."""
        attn = batch["attention_mask"]
        text = (attn.long().cumsum(-1) - 1).masked_fill(attn == 0, 0)
        if self.rope is None:
            return text, text[:, -1:] + 1
        if batch.get("image_grid_thw") is not None or batch.get("video_grid_thw") is not None:
            names = inspect.signature(self.rope.get_rope_index).parameters
            kw = {k: batch[k] for k in ("mm_token_type_ids", "image_grid_thw", "video_grid_thw",
                                        "second_per_grid_ts", "attention_mask") if k in names and k in batch}
            vision, _ = self.rope.get_rope_index(batch["input_ids"], **kw)
        else:
            vision = text.unsqueeze(0).expand(3, -1, -1)
        # [4, P, T]: text positions first, as generate passes them (the rotary uses the last three)
        return torch.cat([text.unsqueeze(0), vision], 0), vision[:, :, -1].T + 1

    @contextmanager
    def sdpa(self):
        """Decode attention through SDPA (it takes the prepared boolean mask) whatever the model's
        prefill attention is (flash-attention, eager)."""
        saved = [c._attn_implementation_internal for c in self._configs]
        try:
            for c in self._configs:
                c._attn_implementation_internal = "sdpa"
            yield
        finally:
            for c, impl in zip(self._configs, saved):
                c._attn_implementation_internal = impl


def _is_fsdp(model) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


# --- the engine ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Mode:
    """How a pass samples; part of a graph's key. ``top_p``/``temperature`` are baked into the top-p
    path's graph (the fixed-point sampler takes Python floats); the kernel reads its temperature from
    device memory, so greedy/sample graphs serve every temperature."""

    kind: str  # "greedy" | "sample" | "top_p"
    top_p: float = 1.0
    temperature: float = 0.0

    @staticmethod
    def of(greedy: bool, temperature: float, top_p: float) -> _Mode:
        if greedy:
            return _Mode("greedy")
        if top_p < 1.0:
            return _Mode("top_p", float(top_p), float(temperature))
        return _Mode("sample")


@dataclass
class _Prefill:
    logits: torch.Tensor  # [P, V] at each prompt's last position
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer [P, kv heads, T, head dim]
    next_pos: torch.Tensor  # [P, rope_dims]
    attention_mask: torch.Tensor  # [P, T]


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
    distinct graph shapes); default with CUDA graphs: eight steps per octave (:func:`prompt_columns`),
    else exact.

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
        self.face = _ModelFace(model)
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
        self._buf: dict | None = None  # static buffers (see _allocate)
        self._graphs: dict = {}
        self._pool = None
        self._fingerprint = None
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
        built by :func:`lgrpo.rollout.finish_rollout` as the hf path builds it.
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
        mode = _Mode.of(greedy, temperature, top_p)
        pre = self._prefill(prompts)
        n_prompts, t = pre.attention_mask.shape
        rows = n_prompts * group_size
        b = bucket_for(rows)
        graphs = self._use_graphs(pre.logits.device)
        t_cap = prompt_columns(t, self.prompt_bucket, graphs)
        self._ensure_buffers(b, t_cap, pre)
        key = (t_cap, mode, _autocast_state(pre.logits.device))
        if graphs:
            fingerprint = tuple(p.data_ptr() for p in self.model.parameters())
            if fingerprint != self._fingerprint:  # the weights moved: every captured graph is stale
                self._drop_graphs()
                self._fingerprint = fingerprint
            for nb in self._capture_plan(b):
                self._graph(nb, t_cap, mode, key)
        self._setup(pre, group_size, b, t_cap, mode, temperature, seed, step, row_ids)
        s = self._buf
        first = pre.logits.index_select(0, s["prompt_of"][:b])
        self._record(b, first, s["j"], mode)  # completion token 0, from the prompts' last logits

        n_steps = self.max_new_tokens - 1
        for it in range(n_steps):
            if it % self.check_every == 0:
                alive = int((~s["done"][:b]).sum())
                everyone = alive
                if reduce_max is not None:
                    everyone = int(reduce_max(torch.tensor([alive], device=s["done"].device)).item())
                if everyone == 0:
                    break
                nb = bucket_for(alive)
                if self.compact and nb < b:
                    self._compact(b, nb)
                    b = nb
            if graphs:
                self._graphs[(b,) + key].replay()
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

    def _prefill(self, prompts: PromptBatch) -> _Prefill:
        face = self.face
        inputs = prompts.model_inputs(self.model)
        positions, next_pos = face.prefill_positions(inputs)
        out = self.model(**inputs, position_ids=positions, use_cache=True, logits_to_keep=1)
        cache = getattr(out, "cache", None)
        if cache is None:
            cache = out.past_key_values
        return _Prefill(out.logits[:, -1].float(), _cache_layers(cache), next_pos, prompts.attention_mask)

    def _use_graphs(self, device: torch.device) -> bool:
        if self.cuda_graphs == "auto":
            return device.type == "cuda" and not _is_fsdp(self.model)
        if self.cuda_graphs and device.type != "cuda":
            raise ValueError("cuda_graphs=True needs the model on a CUDA device")
        return bool(self.cuda_graphs)

    # -- static buffers ---------------------------------------------------------------------------

    def _ensure_buffers(self, b: int, t_cap: int, pre: _Prefill) -> None:
        k0 = pre.kv[0][0]
        vocab = pre.logits.shape[-1]
        length = t_cap + self.max_new_tokens
        s = self._buf
        fits = (s is not None and s["rows"] >= b and s["length"] >= length and s["vocab"] == vocab
                and s["kv_dtype"] == k0.dtype and s["device"] == k0.device and s["layers"] == len(pre.kv)
                and s["kv_shape"] == tuple(k0.shape[1::2]))
        if fits:
            return
        self._drop_graphs()  # graphs point into the old buffers
        self._buf = None
        dev = k0.device
        rows, length = b, length
        if self._criteria is None or self._criteria.vocab_size != vocab:
            self._criteria = StopCriteria(self.tokenizer, vocab, self.eos_ids, self.stop)
        self._criteria.to(dev)
        banned = torch.zeros(vocab, dtype=torch.int8, device=dev)
        ids = [i for i in self.face.banned if 0 <= i < vocab]
        if ids:
            banned[ids] = 1
        long = dict(dtype=torch.long, device=dev)
        trash = rows  # outputs of padding slots go to this extra row
        self._buf = {
            "rows": rows, "length": length, "vocab": vocab, "kv_dtype": k0.dtype, "device": dev,
            "layers": len(pre.kv), "kv_shape": tuple(k0.shape[1::2]), "trash": trash,
            # zeros, not empty: masked cache columns are multiplied by 0 in attention, never NaN * 0
            "kv": [(torch.zeros(rows, k.shape[1], length, k.shape[3], dtype=k.dtype, device=dev),
                    torch.zeros(rows, v.shape[1], length, v.shape[3], dtype=v.dtype, device=dev))
                   for k, v in pre.kv],
            # per slot (moved together by _compact)
            "tokens": torch.zeros(rows, **long),
            "next_pos": torch.zeros(rows, self.face.rope_dims, **long),
            "row_ids": torch.zeros(rows, **long),
            "orig": torch.full((rows,), trash, **long),
            "stop_state": torch.zeros(rows, **long),
            "done": torch.ones(rows, dtype=torch.bool, device=dev),
            "mask": torch.zeros(rows, length, dtype=torch.bool, device=dev),
            "uniforms": torch.zeros(rows, self.max_new_tokens, dtype=torch.float64, device=dev),
            "prompt_of": torch.zeros(rows, **long),
            # per output row (index orig), plus the trash row
            "out": torch.full((rows + 1, self.max_new_tokens), self.pad_id, **long),
            "stop_len": torch.full((rows + 1,), -1, **long),  # -1: not stopped
            "bad": torch.zeros(rows + 1, dtype=torch.bool, device=dev),
            # scalars read by the step
            "j": torch.zeros(1, **long),
            "key": torch.zeros(2, **long),
            "temperature": torch.ones(1, dtype=torch.float32, device=dev),
            "banned": banned if ids else None,
        }

    SLOT_KEYS = ("tokens", "next_pos", "row_ids", "orig", "stop_state", "done", "mask", "uniforms", "prompt_of")

    def _setup(self, pre, group_size, b, t_cap, mode, temperature, seed, step, row_ids):
        """Write one pass's starting state: the forked cache, masks, positions, row ids."""
        s = self._buf
        dev = s["device"]
        n_prompts, t = pre.attention_mask.shape
        rows = n_prompts * group_size
        length = t_cap + self.max_new_tokens
        prompt_of = torch.cat([torch.arange(rows) // group_size, torch.zeros(b - rows, dtype=torch.long)])
        s["prompt_of"][:b].copy_(prompt_of)
        for (k, v), (pk, pv) in zip(s["kv"], pre.kv):
            for dst, src in ((k, pk), (v, pv)):
                # the G-way fork: each prompt's keys/values copied into its G rows (no [N, T] temporary)
                dst[:rows].unflatten(0, (n_prompts, group_size))[:, :, :, :t].copy_(
                    src.unsqueeze(1).expand(-1, group_size, -1, -1, -1))
                if b > rows:  # padding slots: a copy of prompt 0 (done from the start)
                    dst[rows:b, :, :t].copy_(src[:1].expand(b - rows, -1, -1, -1))
                dst[:b, :, t:length].zero_()
        s["mask"][:b].zero_()
        s["mask"][:b, :t].copy_(pre.attention_mask.to(dev).bool().index_select(0, prompt_of.to(dev)))
        s["next_pos"][:b].copy_(pre.next_pos.index_select(0, prompt_of.to(pre.next_pos.device)))
        s["row_ids"][:b].copy_(torch.cat([row_ids, torch.zeros(b - rows, dtype=torch.long)]))
        s["orig"][:b].copy_(torch.cat([torch.arange(rows), torch.full((b - rows,), s["trash"])]))
        s["done"][:b].copy_(torch.arange(b) >= rows)
        s["stop_state"][:b].zero_()
        s["tokens"][:b].fill_(self.pad_id)
        s["out"].fill_(self.pad_id)
        s["stop_len"].fill_(-1)
        s["bad"].zero_()
        s["j"].zero_()
        s["key"].copy_(key_tensor(seed, step))
        s["temperature"].fill_(float(temperature))
        if mode.kind == "top_p":
            u = counter_uniform(seed, step, row_ids, torch.arange(self.max_new_tokens))
            s["uniforms"][:rows].copy_(u)

    # -- the device step ----------------------------------------------------------------------------

    def _decode_step(self, b: int, t_cap: int, mode: _Mode) -> None:
        """Feed each slot's last token, write its keys/values at column ``t_cap + j``, sample token
        ``j + 1`` and advance ``j``: device work only (capturable)."""
        s = self._buf
        j = s["j"]
        length = t_cap + self.max_new_tokens
        write = j + t_cap
        s["mask"][:b].index_fill_(1, write, True)
        cache = _StepCache([(k[:b, :, :length], v[:b, :, :length]) for k, v in s["kv"]], write, length)
        pos = s["next_pos"][:b] + j
        position_ids = pos.T.unsqueeze(-1) if self.face.rope is not None else pos
        mask = s["mask"][:b, :length].view(b, 1, 1, length)
        out = self.model(input_ids=s["tokens"][:b].unsqueeze(1), position_ids=position_ids,
                         attention_mask={t: mask for t in self.face.layer_types},
                         **{self.face.cache_kw: cache}, use_cache=True, logits_to_keep=1)
        self._record(b, out.logits[:, -1], j + 1, mode)
        j.add_(1)

    def _sample(self, b: int, logits: torch.Tensor, t: torch.Tensor, mode: _Mode):
        s = self._buf
        if mode.kind == "top_p":  # the hf path's fixed-point inverse-CDF sampler, after the ban
            x = logits.float()
            if s["banned"] is not None:
                x = x.masked_fill(s["banned"].bool(), float("-inf"))
            u = s["uniforms"][:b].index_select(1, t).squeeze(1)
            return sample_from_logits(x, u, mode.temperature, mode.top_p)
        if logits.dtype == torch.float64:  # the kernel reads fp32/bf16/fp16 (generate samples in fp32 too)
            logits = logits.float()
        sample = sample_tokens if logits.is_cuda else CPU_SAMPLER
        return sample(logits, s["key"], s["row_ids"][:b], t.expand(b), s["temperature"], s["banned"],
                      greedy=mode.kind == "greedy")

    def _record(self, b: int, logits: torch.Tensor, t: torch.Tensor, mode: _Mode) -> None:
        """Sample completion token ``t`` (a device scalar) of the first ``b`` slots and record it."""
        s = self._buf
        ids, empty = self._sample(b, logits, t, mode)
        alive = ~s["done"][:b]
        ids = torch.where(alive, ids, self.pad_id)
        orig = s["orig"][:b]
        s["out"].index_put_((orig, t.expand(b)), ids)
        s["bad"].index_put_((orig,), s["bad"].index_select(0, orig) | (empty & alive))
        state, stopped = self._criteria.step(s["stop_state"][:b], ids)
        hit = alive & stopped
        s["stop_len"].index_put_((orig,), torch.where(hit, t + 1, s["stop_len"].index_select(0, orig)))
        s["done"][:b] |= hit
        s["stop_state"][:b].copy_(state)
        s["tokens"][:b].copy_(ids)

    # -- host-side bookkeeping ----------------------------------------------------------------------

    def _compact(self, b: int, nb: int) -> None:
        """Move the live slots to the front and pad to ``nb`` slots with finished ones."""
        s = self._buf
        done = s["done"][:b]
        live = (~done).nonzero().flatten()
        filler = done.nonzero().flatten()[: nb - len(live)]
        src = torch.cat([live, filler])
        for name in self.SLOT_KEYS:
            s[name][:nb] = s[name][src]
        s["orig"][len(live):nb] = s["trash"]
        length = s["length"]
        for k, v in s["kv"]:
            k[:nb, :, :length] = k[src, :, :length]
            v[:nb, :, :length] = v[src, :, :length]
        self.stats["compactions"] += 1

    def release(self) -> None:
        """Free the static cache, the buffers and the captured graphs (the next call rebuilds them)."""
        self._drop_graphs()
        self._buf = None
        self._fingerprint = None

    def _drop_graphs(self) -> None:
        self._graphs.clear()
        self._pool = None

    def _graph(self, b: int, t_cap: int, mode: _Mode, key: tuple):
        full_key = (b,) + key
        if full_key in self._graphs:
            return
        import time

        start = time.perf_counter()
        s = self._buf
        # Safe contents for the warm-up run: finished slots, token 0, one visible column.
        s["done"].fill_(True)
        s["tokens"].zero_()
        s["stop_state"].zero_()
        s["j"].zero_()
        s["mask"][:, 0] = True
        stream = torch.cuda.Stream(device=s["device"])
        stream.wait_stream(torch.cuda.current_stream(s["device"]))
        with torch.cuda.stream(stream), self.face.sdpa(), _uncached_autocast(s["device"]):
            self._decode_step(b, t_cap, mode)  # compiles Triton, picks kernels, allocates workspaces
        torch.cuda.current_stream(s["device"]).wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        s["j"].zero_()
        with torch.cuda.graph(graph, pool=self._pool), self.face.sdpa(), _uncached_autocast(s["device"]):
            self._decode_step(b, t_cap, mode)
        torch.cuda.synchronize(s["device"])
        self._graphs[full_key] = graph
        self.stats["captures"] += 1
        self.stats["capture_s"] += time.perf_counter() - start

    def _collect(self, rows: int, greedy: bool, row_ids: torch.Tensor):
        s = self._buf
        # copies: the buffers belong to the next pass (.cpu() of a CPU tensor would alias them)
        out = s["out"][:rows].to("cpu", copy=True)
        stop_len = s["stop_len"][:rows].to("cpu", copy=True)
        bad = s["bad"][:rows].cpu()
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


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def prompt_columns(t: int, bucket: int | None, graphs: bool) -> int:
    """The cache columns a ``t``-token prompt gets: a multiple of ``bucket`` when given; with CUDA graphs
    (every distinct value is a graph key: ~20 bucket captures each) ``t`` rounded up to eight steps per
    octave, at least 64: at most an eighth of padding columns (masked, read by the decode attention), and
    above 2048 tokens a quarter of the captures that multiples of 64 would cost; else ``t`` itself."""
    if bucket:
        return _round_up(t, bucket)
    if not graphs:
        return t
    return _round_up(t, max(64, 1 << max(t.bit_length() - 4, 0)))


def _autocast_state(device: torch.device) -> tuple:
    kind = device.type
    if not torch.is_autocast_enabled(kind):
        return (False,)
    return (True, torch.get_autocast_dtype(kind))


def _uncached_autocast(device: torch.device):
    """The caller's autocast (same dtype) with its weight cache off, for a graph capture.

    Autocast keeps the low-precision copies of fp32 weights it made for the rest of the ``autocast`` block:
    after the prefill filled that cache, a captured step would record no cast at all and read the cached
    copies' memory, which leaving the block frees (``torch.amp.autocast_mode``); every later replay (the
    next eval batch, the eval after training) would read the old weights or freed memory. Without the
    cache the graph holds the casts themselves and reads the fp32 weights on each replay, so in-place
    updates reach it. (``torch.cuda.make_graphed_callables`` refuses a cached autocast for this reason.)"""
    enabled, *dtype = _autocast_state(device)
    return torch.autocast(device.type, dtype=dtype[0], cache_enabled=False) if enabled else nullcontext()


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
