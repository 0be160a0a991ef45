"""Stopping on the device: the stop string as an automaton over token ids.

A completion stops once its decoded text contains the stop string (``</answer>``). Decoding on the
host after every token costs a device-to-host copy per token; this module moves the test onto the
device as one table lookup per token.

The stop string is matched over *bytes* with the Knuth-Morris-Pratt automaton (state = how many
bytes of the stop string the text currently ends with; ``len(stop)`` = matched, absorbing). Each
token id is lifted to a transition over its bytes: ``table[state, id]`` is the state after feeding
the token's bytes from ``state``. Built once per (tokenizer, stop string) from each token's bytes,
so any way a byte-level BPE splits or merges the stop string at its boundary (``</`` + ``answer``
+ ``>``, ``>\\n``, ``."</``, ...) is handled exactly. For a byte-level BPE a token's bytes come
from the GPT-2 byte alphabet; for any other tokenizer from decoding the id alone.

Equivalent to decoding the completion and testing ``stop in text`` (lgrpo.rollout.hf.StopOnString):
UTF-8 is self-synchronising, so the stop string's bytes occur in the byte stream exactly when its
characters occur in the decoded text.
"""

from __future__ import annotations

import json

import numpy as np
import torch


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    decoder = json.loads(backend.to_str()).get("decoder") or {}

    def walk(d) -> bool:
        if d.get("type") == "ByteLevel":
            return True
        return any(walk(x) for x in d.get("decoders", []) or [])

    return walk(decoder)


def token_bytes(tokenizer, vocab_size: int) -> list[bytes]:
    """The bytes each id ``< vocab_size`` decodes to (special tokens as their text; b"" for ids the
    tokenizer does not have, e.g. the padding rows of a model's embedding matrix)."""
    n = min(len(tokenizer), vocab_size)
    added = {i: t.content for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
    byte_of = {c: b for b, c in _bytes_to_unicode().items()} if _is_byte_level(tokenizer) else None
    out = []
    for i in range(vocab_size):
        piece = pieces[i] if i < n else None
        if piece is None:
            out.append(b"")
        elif i in added:
            out.append(added[i].encode("utf-8"))
        elif byte_of is not None and all(c in byte_of for c in piece):
            out.append(bytes(byte_of[c] for c in piece))
        else:
            text = tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            out.append(text.encode("utf-8"))
    return out


def kmp_byte_automaton(pattern: bytes) -> np.ndarray:
    """``[len(pattern) + 1, 256]`` next states of the KMP automaton; the last state is absorbing."""
    if not pattern:
        raise ValueError("stop must be a non-empty string")
    m = len(pattern)
    dfa = np.zeros((m + 1, 256), dtype=np.int64)
    dfa[0, pattern[0]] = 1
    restart = 0  # the state the automaton would be in after the pattern without its first byte
    for s in range(1, m):
        dfa[s] = dfa[restart]
        dfa[s, pattern[s]] = s + 1
        restart = dfa[restart, pattern[s]]
    dfa[m] = m
    return dfa


def stop_table(tokens: list[bytes], stop: str) -> np.ndarray:
    """``[len(stop) + 1, V]`` int32: the automaton state after each token from each state."""
    pattern = stop.encode("utf-8")
    dfa = kmp_byte_automaton(pattern)
    vocab = len(tokens)
    lengths = np.array([len(t) for t in tokens], dtype=np.int64)
    width = int(lengths.max(initial=0))
    mat = np.zeros((vocab, max(width, 1)), dtype=np.uint8)
    for i, t in enumerate(tokens):
        mat[i, : len(t)] = np.frombuffer(t, dtype=np.uint8)
    state = np.broadcast_to(np.arange(len(pattern) + 1)[:, None], (len(pattern) + 1, vocab)).copy()
    for pos in range(width):  # walk every token's bytes at once; short tokens drop out
        cols = np.nonzero(lengths > pos)[0]
        state[:, cols] = dfa[state[:, cols], mat[cols, pos][None, :]]
    return state.astype(np.int32)


class StopCriteria:
    """The device side of stopping: EOS ids and the stop string's automaton for one vocabulary.

    ``step(state, ids)`` -> ``(new_state, stopped)`` for [B] int tensors; ``state`` starts at 0 for
    each completion. Tensors are moved to a device with :meth:`to`.
    """

    def __init__(self, tokenizer, vocab_size: int, eos_ids, stop: str | None):
        self.vocab_size = vocab_size
        eos = [int(i) for i in eos_ids if i is not None and 0 <= int(i) < vocab_size]
        self.eos = torch.zeros(vocab_size, dtype=torch.bool)
        self.eos[eos] = True
        self.stop = stop
        self.matched = len(stop.encode("utf-8")) if stop else -1
        # flat [(len(stop) + 1) * V]: one gather per step at state * V + id
        self.table = (torch.from_numpy(stop_table(token_bytes(tokenizer, vocab_size), stop)).flatten()
                      if stop else None)

    def to(self, device) -> StopCriteria:
        self.eos = self.eos.to(device)
        if self.table is not None:
            self.table = self.table.to(device)
        return self

    def step(self, state: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        stopped = self.eos[ids]
        if self.table is None:
            return state, stopped
        state = self.table[state * self.vocab_size + ids].to(state.dtype)
        return state, stopped | (state == self.matched)
