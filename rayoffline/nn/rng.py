"""Counter-based random streams for K members: one vectorized hash per draw, whatever K is.

Every number is a pure function of (member seed, stream, draw counter, element index):

    key_k          = splitmix64(seed_k, stream [, rank in split mode])           two 32-bit halves k0, k1
    word(k, c, i)  = f(f(i ^ a_kc) + b_kc) & (2^32 - 1)      a_kc = f(k0 ^ f(c_lo ^ G)), b_kc = f(k1 ^ f(c_hi ^ a_kc))

with f murmur3's 32-bit finalizer (a bijection with full avalanche) evaluated on int64 tensors, c_k the number
of draws member k has made (a (K,) int64 tensor on the device, advanced in place: no host sync, nothing that
a captured graph could not replay), and i the element's index in the draw. From the words:

    rand     u = (w >> 8) * 2^-24                                   in [0, 1), 24 bits (float32's mantissa)
    randn    Box-Muller on two words per normal: sqrt(-2 ln u1) * cos(2 pi u2), u1 in (0, 1]
    randint  (w_a << 30 | w_b >> 2) mod n: 62 bits, so the bias for n rows is below n * 2^-62

So member k's numbers depend only on its seed (a K-member pass reproduces each member's K=1 run), a state is
a (draw count, key) pair per member (exact resume; members of a sweep pack slice and concatenate them), and a
draw costs the same ~20 elementwise kernels for K = 1 or K = 1000, where a generator per member cost K launches
and a stack.

Data-parallel workers: shared (replicate mode) draws the global stream and computes only this rank's rows (the
element indices of rows [rank * b, (rank + 1) * b) of the (world * b, ...) draw); not shared (split mode) mixes
the rank into the key (rank 0 keeps the single-process stream).

Backends. The hash is the right tool where launches are the cost (CUDA: ~20 kernels for any K instead of K
launches and a stack per draw) and where the step is compiled into one fused loop. In eager CPU code torch's own
generators are far faster (one thread, 2-core Xeon: randn of 256 x 10 x 3 per member takes 0.29 ms for K = 1 and
6.0 ms for K = 16 hashed, against 0.02 and 0.36 ms with a generator per member; the CPU already pays nothing per
launch). So `backend="auto"` hashes on CUDA and keeps a torch.Generator per member on CPUs (seeded from the same
key; member k's numbers still depend only on its seed, and the state is the generators' states). A checkpoint's
state says which backend wrote it and `set_state` continues with that one, so a run resumes exactly (generator
states only on the device type that wrote them; counters anywhere).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch

BACKEND = "auto"
"""The backend of MemberRNG(backend=None): 'auto', 'counter' or 'generator' (tests set 'counter' to run the hash
on CPUs)."""
_M32 = (1 << 32) - 1
_GOLDEN = 0x9E3779B9


def _f(x: torch.Tensor) -> torch.Tensor:
    """murmur3 fmix32 on int64 tensors holding values in [0, 2^32). Products wrap modulo 2^64 (two's
    complement), whose low 32 bits are the 32-bit product, so the mask restores the exact 32-bit result."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _M32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _M32
    return x ^ (x >> 16)


def mix_seed(seed: int, stream: int) -> int:
    """Derive an independent 63-bit seed for (seed, stream) (splitmix64 finalizer)."""
    z = (int(seed) * 0x9E3779B97F4A7C15 + (stream + 1) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


class MemberRNG:
    """K random streams on one device; every draw returns a leading member dim (K, ...). See the module
    docstring for the construction and the data-parallel modes."""

    def __init__(self, seeds: Sequence[int], device: torch.device | str, stream: int, rank: int = 0,
                 world: int = 1, shared: bool = True, backend: str | None = None) -> None:
        """backend: 'counter' (the hash), 'generator' (a torch.Generator per member) or 'auto' (counter on CUDA,
        generators elsewhere; see the module docstring); None: the module's BACKEND."""
        backend = BACKEND if backend is None else backend
        if backend not in ("auto", "counter", "generator"):
            raise ValueError(f"backend must be 'auto', 'counter' or 'generator', got {backend!r}")
        self.device = torch.device(device)
        self.seeds, self.stream = [int(s) for s in seeds], stream
        self.rank, self.world, self.shared = rank, world, shared
        self._mixed = stream if shared or rank == 0 else stream + (rank << 8)
        self.k0 = torch.zeros(len(self.seeds), 1, dtype=torch.int64, device=self.device)
        self.k1 = torch.zeros(len(self.seeds), 1, dtype=torch.int64, device=self.device)
        self._set_keys([mix_seed(s, self._mixed) for s in self.seeds])
        self.counter = torch.zeros(len(self.seeds), dtype=torch.int64, device=self.device)  # draws made, per member
        self._gens: _GeneratorStreams | None = None  # the generator backend, when in use
        if backend == "generator" or backend == "auto" and self.device.type != "cuda":
            self._gens = _GeneratorStreams(self)

    def _set_keys(self, keys: Sequence[int]) -> None:
        """Each member's 64-bit stream key (in place: a captured graph keeps reading the same tensors)."""
        self.keys = [int(k) for k in keys]
        self.k0.copy_(torch.tensor([[k & _M32] for k in self.keys], dtype=torch.int64))
        self.k1.copy_(torch.tensor([[(k >> 32) & _M32] for k in self.keys], dtype=torch.int64))

    @property
    def backend(self) -> str:
        return "generator" if self._gens is not None else "counter"

    @property
    def members(self) -> int:
        return len(self.seeds)

    # ----- drawing ------------------------------------------------------------------------------------
    def _words(self, size: Sequence[int], lanes: int) -> list[torch.Tensor]:
        """`lanes` tensors of 32-bit words, each (K, *size), for this draw; advances the counter."""
        size = tuple(int(s) for s in size)
        per = math.prod(size)
        first = 0
        if self.shared and self.world > 1 and size:
            first = self.rank * per  # this rank's rows of the (world * rows, ...) global draw
        c = self.counter[:, None]
        a = _f(self.k0 ^ _f((c & _M32) ^ _GOLDEN))                                # (K, 1)
        b = _f(self.k1 ^ _f(((c >> 32) & _M32) ^ a))                               # (K, 1)
        idx = torch.arange(first * lanes, (first + per) * lanes, dtype=torch.int64, device=self.device)
        words = _f((_f(idx[None] ^ a) + b) & _M32)                                 # (K, per * lanes)
        self.counter += 1
        words = words.view(-1, per, lanes) if lanes > 1 else words.view(-1, per, 1)
        return [words[..., j].reshape(-1, *size) for j in range(lanes)]

    def rand(self, size: Sequence[int]) -> torch.Tensor:
        if self._gens is not None:
            return self._gens.draw(torch.rand, size)
        (w,) = self._words(size, 1)
        return (w >> 8).to(torch.float32) * (1.0 / (1 << 24))

    def randn(self, size: Sequence[int]) -> torch.Tensor:
        if self._gens is not None:
            return self._gens.draw(torch.randn, size)
        w1, w2 = self._words(size, 2)
        u1 = ((w1 >> 8) + 1).to(torch.float32) * (1.0 / (1 << 24))               # (0, 1]
        u2 = (w2 >> 8).to(torch.float32) * (1.0 / (1 << 24))
        return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)

    def randint(self, high: int, size: Sequence[int]) -> torch.Tensor:
        if self._gens is not None:
            return self._gens.draw(lambda sz, **kw: torch.randint(high, sz, **kw), size)
        hi, lo = self._words(size, 2)
        return ((hi << 30) | (lo >> 2)) % int(high)

    # ----- state --------------------------------------------------------------------------------------
    def get_state(self) -> list[Any]:
        """One entry per member: [draw count, stream key] (counter backend: the state says which stream it is,
        so it continues in a learner built with other seeds, as a generator's state does), or a generator's
        state."""
        if self._gens is not None:
            return self._gens.get_state()
        return [[int(c), k] for c, k in zip(self.counter.tolist(), self.keys)]

    def set_state(self, states: Sequence[Any]) -> None:
        """Continue from get_state()'s result; also plain draw counts (the streams keep this learner's keys)."""
        if len(states) != self.members:
            raise ValueError(f"RNG state for {len(states)} members, this run has {self.members}")
        if all(_is_int(s) or isinstance(s, (list, tuple)) and len(s) == 2 and all(map(_is_int, s)) for s in states):
            self.counter.copy_(torch.tensor([s if _is_int(s) else s[0] for s in states], dtype=torch.int64))
            self._set_keys([k if _is_int(s) else s[1] for s, k in zip(states, self.keys)])
            self._gens = None
            return
        if all(isinstance(s, torch.Tensor) and s.dtype == torch.uint8 for s in states):  # generators' states
            gens = _GeneratorStreams(self)
            try:
                gens.set_state(states)
            except RuntimeError:
                raise ValueError(f"the random streams were saved by torch generators of another device type than "
                                 f"{self.device.type}; they continue exactly only there") from None
            self._gens = gens
            return
        raise ValueError("unrecognized RNG state: expected one draw count or one generator state per member")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_counter_state(states: Sequence[Any]) -> bool:
    """Whether `states` (a MemberRNG state) is the counter backend's (draw counts), not generators'."""
    return all(_is_int(s) or isinstance(s, (list, tuple)) for s in states)


class _GeneratorStreams:
    """A torch.Generator per member: the generator backend (CPUs, and the streams of checkpoints written
    before the counter-based ones)."""

    def __init__(self, rng: MemberRNG) -> None:
        self.rng = rng
        self.gens = [torch.Generator(device=rng.device).manual_seed(mix_seed(s, rng._mixed)) for s in rng.seeds]

    def draw(self, fn: Callable[..., torch.Tensor], size: Sequence[int]) -> torch.Tensor:
        size, r = tuple(size), self.rng
        if r.shared and r.world > 1 and size:
            rows = size[0]
            full = (rows * r.world, *size[1:])
            out = torch.stack([fn(full, generator=g, device=r.device) for g in self.gens])
            return out[:, r.rank * rows:(r.rank + 1) * rows]
        return torch.stack([fn(size, generator=g, device=r.device) for g in self.gens])

    def get_state(self) -> list[torch.Tensor]:
        return [g.get_state() for g in self.gens]

    def set_state(self, states: Sequence[torch.Tensor]) -> None:
        for g, s in zip(self.gens, states):
            g.set_state(s.cpu())
