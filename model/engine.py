"""The public engine API of ArmtModel: forward_long, new_state, ingest, generate (and input checking).

    logits, state = m.forward_long(ids)          # official forward from empty memory
    state = m.ingest(m.new_state(), ids)         # whole segments written; remainder pending
    for tok in m.generate(state, prompt_ids): ...  # never mutates `state`

Executors are looked up by name; each maps (model, ids [B, T], A, z, first, want_logits) -> (logits, A, z).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from .act import ActRun, ActStats
from .diagonal import Stream, run_diagonal, run_streams
from .generation import SamplingParams, decode_final_segment
from .sequential import run_sequential
from .state import MemoryState

EXECUTORS = {"sequential": run_sequential, "diagonal": run_diagonal}

IdsLike = torch.Tensor | Sequence[int] | Sequence[Sequence[int]]


class ArmtEngineMixin:
    """Engine methods; expects `config`, `base`, `fingerprint`, `device`, `n_layers`, `segment_forward`."""

    # ------------------------------------------------------------------ inputs
    def check_ids(self, ids: IdsLike, name: str = "input_ids", allow_empty: bool = False) -> torch.Tensor:
        """Validate token ids; returns a [B, T] int64 tensor on the model's device."""
        if not isinstance(ids, torch.Tensor):
            try:  # the values' own type (a list is on no device): 1.7 or True must be refused, not truncated
                ids = torch.as_tensor(ids if hasattr(ids, "__array__") else list(ids), device=self.device)
            except (TypeError, ValueError, RuntimeError) as e:
                raise ValueError(f"{name} must be integer token ids: {e}") from None
            if ids.numel() == 0:
                ids = ids.to(torch.int64)  # an empty list is float to torch
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise ValueError(f"{name} must have an integer dtype, got {ids.dtype}")
        if ids.dtype in (torch.uint16, torch.uint32, torch.uint64):  # torch has no min/max for these (uint8 has)
            ids = ids.to(torch.int64)  # a uint64 id >= 2**63 turns negative: refused below as outside the vocabulary
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.dim() != 2 or ids.shape[0] == 0:
            raise ValueError(f"{name} must be [T] or [B, T] with B >= 1, got shape {tuple(ids.shape)}")
        if ids.device.type != self.device.type:
            raise ValueError(f"{name} is on {ids.device} but the model is on {self.device}")
        if ids.shape[1] == 0 and not allow_empty:
            raise ValueError(f"{name} is empty: at least one token is needed")
        vocab = self.base.vocab_size
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
            raise ValueError(f"{name} holds token id {bad}, outside the vocabulary [0, {vocab})")
        return ids.to(torch.int64)

    def _check_state(self, state: MemoryState) -> None:
        """This model's state: its fingerprint, the memory's shapes, pending ids in the vocabulary."""
        state.check(self.fingerprints)
        shape = (self.n_layers, self.config.d_key, self.base.d_model)
        if tuple(state.A.shape) != shape or tuple(state.z.shape) != shape[:2]:
            raise ValueError(f"memory state has A {tuple(state.A.shape)}, z {tuple(state.z.shape)}; this model "
                             f"needs {shape} and {shape[:2]}")
        if state.pending and not 0 <= min(state.pending) <= max(state.pending) < self.base.vocab_size:
            raise ValueError(f"memory state's pending tokens are outside the vocabulary [0, {self.base.vocab_size})")
        if len(state.pending) >= self.config.segment_size:  # ingest writes every whole segment; never made here
            raise ValueError(f"memory state has {len(state.pending)} pending tokens; a state holds fewer than one "
                             f"segment ({self.config.segment_size}) unwritten")

    def _executor(self, name: str):
        """The executor by name; ACT models always run the sequential order (per-token hop counts differ by layer,
        which one diagonal step cannot batch)."""
        if name not in EXECUTORS:
            raise ValueError(f"unknown executor {name!r}; available: {sorted(EXECUTORS)}")
        return run_sequential if self.config.act else EXECUTORS[name]

    def _empty_memory(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A and z in memory_dtype: float32 for a float32, bf16 or fp16 model (the memory math runs in the state's
        dtype), float64 for a float64 one (the reference of exactness checks; only its RoPE tables stay float32, as
        HF computes them)."""
        L, d_key, d = self.n_layers, self.config.d_key, self.base.d_model
        A = torch.zeros(batch, L, d_key, d, device=self.device, dtype=self.memory_dtype)  # [B, L, d_key, d]
        z = torch.zeros(batch, L, d_key, device=self.device, dtype=self.memory_dtype)  # [B, L, d_key]
        return A, z

    @property
    def memory_dtype(self) -> torch.dtype:
        """float32, or float64 for a float64 model; a state of the other one is converted when used."""
        return torch.promote_types(self.dtype, torch.float32)

    # ------------------------------------------------------------------ API
    def new_state(self) -> MemoryState:
        """Empty memory for a new session (fp32 A and z whatever the model dtype; float64 for a float64 model)."""
        A, z = self._empty_memory(1)
        return MemoryState(A[0], z[0], self.fingerprint)

    @torch.no_grad()
    def forward_long(self, input_ids: IdsLike, executor: str = "sequential", max_hop: int | None = None,
                     act_stats: ActStats | None = None, act_threshold: float | None = None,
                     act_fixed: bool | None = None):
        """Official forward from empty memory: every segment, the short last one too, is read and written.

        input_ids [T] or [B, T] -> (logits [B, T, V], state) where state is a MemoryState for B == 1 and a list
        of MemoryStates (one per row) for B > 1. For ACT models, `max_hop`, `act_threshold` (1 - epsilon) and
        `act_fixed` override the configured ones and `act_stats` (an ActStats) receives the hops actually used.
        """
        act = ActRun.for_model(self.config, max_hop, act_stats, threshold=act_threshold, fixed=act_fixed)
        run = self._executor(executor)
        ids = self.check_ids(input_ids)
        B, T = ids.shape
        A, z = self._empty_memory(B)
        first = torch.ones(B, dtype=torch.bool, device=self.device)
        logits, A, z = run(self, ids, A, z, first, True, act)
        n_segments = -(-T // self.config.segment_size)
        # each row's memory copied out of the batch tensor: a view would keep all B rows alive with every state
        states = [MemoryState(A[b].clone(), z[b].clone(), self.fingerprint, [], n_segments, T) for b in range(B)]
        return logits, (states[0] if B == 1 else states)

    @torch.no_grad()
    def ingest(self, state: MemoryState, input_ids: IdsLike, executor: str = "sequential") -> MemoryState:
        """Append tokens to a session: whole segments are written, the remainder stays pending.

        The result depends only on the concatenation of everything ever ingested, never on how it was split.
        Returns a new MemoryState; `state` is left as it was.
        """
        run = self._executor(executor)  # a misspelt name is an error even when nothing is written yet
        tokens, n_write = self._plan_ingest(state, input_ids)
        if not n_write:  # only the pending tail grows; the memory is copied, never shared between states
            return self._advanced(state, tokens, 0, *self._memory_copy(state))
        first = torch.tensor([state.segments == 0], device=self.device)
        write_ids = torch.tensor([tokens[:n_write]], dtype=torch.int64, device=self.device)  # [1, n_write]
        A, z = (x.unsqueeze(0).to(self.device, self.memory_dtype) for x in (state.A, state.z))  # [1, L, ...]
        _, A, z = run(self, write_ids, A, z, first, False)  # new tensors; inputs untouched
        return self._advanced(state, tokens, n_write, A[0], z[0])

    @torch.no_grad()
    def ingest_many(self, states: Sequence[MemoryState], ids_list: Sequence[IdsLike],
                    lanes: int | None = None) -> list[MemoryState]:
        """`ingest` for several sessions at once through one diagonal pipeline: up to `lanes` sessions side by side
        sharing each layer's weights (default model/diagonal.py LANES: 4 on a CPU, 16 on a GPU), more following
        back to back in each lane (no drain between them).

        Each result equals `ingest(states[i], ids_list[i])` run alone.
        """
        if len(states) != len(ids_list):
            raise ValueError(f"ingest_many got {len(states)} states but {len(ids_list)} id lists")
        if self.config.act:  # ACT runs sequentially (see _executor)
            return [self.ingest(state, ids) for state, ids in zip(states, ids_list)]
        plans = [(state, *self._plan_ingest(state, ids)) for state, ids in zip(states, ids_list)]
        streams = [Stream(torch.tensor(tokens[:n_write], dtype=torch.int64, device=self.device),  # [n_write]
                          state.A.to(self.device, self.memory_dtype), state.z.to(self.device, self.memory_dtype),
                          state.segments == 0)
                   for state, tokens, n_write in plans if n_write]
        _, A, z = run_streams(self, streams, max_lanes=lanes) if streams else (None, None, None)
        results, k = [], 0
        for state, tokens, n_write in plans:
            if n_write:  # copied out of the pipeline's [N, L, ...] tensor (a view kept all N sessions' memory)
                results.append(self._advanced(state, tokens, n_write, A[k].clone(), z[k].clone()))
                k += 1
            else:
                results.append(self._advanced(state, tokens, 0, *self._memory_copy(state)))
        return results

    def _plan_ingest(self, state: MemoryState, input_ids: IdsLike) -> tuple[list[int], int]:
        """(pending tail + new ids, how many of them form whole segments to write now)."""
        self._check_state(state)
        ids = self.check_ids(input_ids, allow_empty=True)
        if ids.shape[0] != 1:
            raise ValueError(f"ingest takes one session's ids [T] or [1, T], got batch {ids.shape[0]}")
        tokens = state.pending + ids[0].tolist()
        S = self.config.segment_size
        return tokens, (len(tokens) // S) * S

    def _memory_copy(self, state: MemoryState) -> tuple[torch.Tensor, torch.Tensor]:
        """A state's A and z as a new state gets them when nothing is written: copies (states never share memory)
        in memory_dtype on the model's device, as a write would leave them."""
        return tuple(x.to(self.device, self.memory_dtype, copy=True) for x in (state.A, state.z))

    def _advanced(self, state: MemoryState, tokens: list[int], n_write: int, A, z) -> MemoryState:
        segments = state.segments + n_write // self.config.segment_size
        return MemoryState(A, z, self.fingerprint, tokens[n_write:], segments, state.tokens_written + n_write)

    def generate(
        self,
        state: MemoryState,
        prompt_ids: IdsLike,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop_token_ids: Sequence[int] | None = None,
        seed: int | None = None,
        executor: str = "sequential",
        max_hop: int | None = None,
        act_stats: ActStats | None = None,
        act_threshold: float | None = None,
        act_fixed: bool | None = None,
        own_segment: bool = False,
    ) -> Iterator[int]:
        """Yield new token ids one by one for pending tail + prompt; `state` is never modified.

        Layout (_answer_layout): as the official generate, every segment_size tokens of pending + prompt but the
        last are written and the last is read; own_segment=True (a question, as the service asks it) starts the
        prompt in a segment of its own when pending + prompt do not fit in one.

        stop_token_ids defaults to the base config's eos_token_id (as HF generate); a stop token is yielded and
        ends the stream. Greedy unless temperature > 0. ACT models: `max_hop` (and `act_threshold`, `act_fixed`)
        set the hop limit of the answer's segment (the final one, read-only, and its new tokens); the segments
        written before it (see _answer_layout) use the configured ones, as `ingest` would. `act_stats` receives
        the hops used.
        """
        act = ActRun.for_model(self.config, max_hop, act_stats, threshold=act_threshold, fixed=act_fixed)
        self._executor(executor)  # checked now, not when the returned iterator first runs
        self._check_state(state)
        params = SamplingParams(max_new_tokens, temperature, top_p, self._stop_ids(stop_token_ids), seed)
        ids = self.check_ids(prompt_ids, name="prompt_ids", allow_empty=True)
        if ids.shape[0] != 1:
            raise ValueError(f"generate takes one prompt [T] or [1, T], got batch {ids.shape[0]}")
        writes, final = self._answer_layout(state.pending, ids[0].tolist(), own_segment)
        self._check_decode_positions(len(final), max_new_tokens)
        return self._generate(state, writes, final, params, executor, act)

    def _answer_layout(self, pending: list[int], prompt: list[int],
                       own_segment: bool) -> tuple[list[list[int]], list[int]]:
        """(token runs to write first, the final read-only segment) for pending tail + prompt.

        Together when they fit in one segment. Otherwise, officially, every segment_size tokens but the last are
        written. With own_segment the prompt starts a segment of its own instead, the pending tail written before
        it as a short segment: cut where the segment size falls, a question that straddles two segments is lost
        (the default model, QA1 at 4 segments: 0/24 right with only its '?' in the final segment, 7/24 with
        ' Mary?'; 24/24 both, this way). A prompt longer than a segment is then cut from its start.
        """
        S = self.config.segment_size
        if not pending and not prompt:
            raise ValueError("prompt_ids is empty and the state has no pending tokens: nothing to continue")
        if len(pending) + len(prompt) <= S:
            return [], pending + prompt
        if not own_segment:
            n = ((len(pending) + len(prompt) - 1) // S) * S  # every segment but the last
            return [(pending + prompt)[:n]], (pending + prompt)[n:]
        n = ((len(prompt) - 1) // S) * S  # the prompt's segments but its last are written
        return [part for part in (pending, prompt[:n]) if part], prompt[n:]

    def _generate(self, state, writes, final, params, executor, act) -> Iterator[int]:
        with torch.no_grad():
            A, z = (x.unsqueeze(0).to(self.device, self.memory_dtype) for x in (state.A, state.z))
            first = torch.tensor([state.segments == 0], device=self.device)
            for tokens in writes:  # pending tail, then the prompt's whole segments
                write_ids = torch.tensor([tokens], dtype=torch.int64, device=self.device)  # [1, n]
                # written as `ingest` writes (the configured hop limit): a max_hop override applies to the
                # answer's read-only segment only
                _, A, z = self._executor(executor)(self, write_ids, A, z, first, False)
                first = torch.zeros_like(first)
        final_ids = torch.tensor([final], dtype=torch.int64, device=self.device)  # [1, n]
        yield from decode_final_segment(self, final_ids, A, z, first, params, act)

    def default_stop_ids(self) -> tuple[int, ...]:
        """The stop tokens `generate` uses when given none (the base config's eos_token_id)."""
        return self._stop_ids(None)

    def _stop_ids(self, stop_token_ids: Sequence[int] | None) -> tuple[int, ...]:
        if stop_token_ids is not None:
            return tuple(int(t) for t in stop_token_ids)
        eos = getattr(self.base.config, "eos_token_id", None)
        if eos is None:
            return ()
        return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)

    def _check_decode_positions(self, final_len: int, max_new_tokens: int) -> None:
        limit = self.base.max_positions
        needed = final_len + int(self.config.use_sink) + max_new_tokens - 1
        if limit is not None and needed > limit:
            raise ValueError(
                f"final segment of {final_len} tokens + {max_new_tokens} new tokens needs {needed} positions "
                f"but the GPT-2 base has n_positions={limit}; lower max_new_tokens"
            )
