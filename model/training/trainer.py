"""Curriculum trainer: segments 0 (dense) -> 1 -> 2 -> 4 -> 8 -> 16, AdamW with warm-up, clipping, probe, replay.

One step = one batch of task documents of the current stage (or, with probability `replay`, of an earlier stage)
plus an auxiliary key-gap-value batch. The stage advances when the running training accuracy and a held-out check
(fresh documents from a separate generator) both pass `advance_at`. With `stream_max` (remember), the last stage's
documents are windows of long streams whose memory carries over from step to step (streams.py). Checkpoints hold
the model, the probe, the optimizer, the curriculum position, the streams and every random generator, so a resumed
run continues exactly.
"""
from __future__ import annotations

import json
import math
import random
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..tasks import Codec
from ..tasks.cellular_automata import check_k
from .batches import aux_batch, shortest_length, task_batch
from .evaluate import accuracy
from .objective import Probe, losses
from .reasoning import ca_accuracy, ca_batch
from .streams import Streams


@dataclass
class TrainConfig:
    task: str = "qa1"
    stages: tuple[int, ...] = (0, 1, 2, 4, 8, 16)
    batch_size: int = 32
    aux_batch_size: int = 16  # key-gap-value samples per step (0: off)
    copy_batch_size: int = 8  # prose-repeat (copy) samples per step, with the auxiliary batch
    dense_distinct: bool = True  # dense stage: each person moves at most once (no latest-move ambiguity)
    questions: int = 4  # questions per training document
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.01
    warmup: int = 200
    decay: str = "time"  # cosine to lr * min_lr_ratio over the time budget ("time"), over max_steps ("steps"), "none"
    min_lr_ratio: float = 0.05
    clip: float = 1.0
    probe_weight: float = 0.2  # 0: no probe
    probe_layer: int = 2  # 0-based block index whose output the probe reads
    probe_max_stage: int = 2  # the probe applies to documents of at most this many segments
    replay: float = 0.3
    advance_at: float = 0.9
    stage_minutes: float = 0.0  # also advance after this long in one stage (0: only on accuracy)
    ask_past: float = 0.0  # remember: share of training questions about any pair but the last (uniformly)
    grad_segments: int = 0  # truncated back-propagation: only the last N segments of a document (0: all)
    stream_max: int = 0  # remember, last stage: rows are streams carrying memory across steps, N segments long
    heldout: int = 256
    check_every: int = 20
    minutes: float = 45.0
    max_steps: int = 100_000
    seed: int = 0
    checkpoint_every: float = 300.0  # seconds
    ca_k: int | None = None  # task "ca": the state k steps ahead (None: the variant's default, see ca_sample)
    ca_variant: str = "os"  # task "ca": os | oo | shift
    ca_context: bool = False  # task "ca": also predict the given states s1..s9 (more signal per orbit)
    ponder_tau: float = 1e-3  # ACT models: weight of the ponder cost (hops + remainder per token)

    def __post_init__(self):
        if self.stream_max and self.task != "remember":
            raise ValueError(f"memory streams (stream_max) are for task remember, not {self.task}")
        if self.task == "ca":
            check_k(self.ca_k, self.ca_variant)
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0 steps, got {self.warmup}")
        if self.stream_max and self.stages and self.stream_max <= self.stages[-1]:
            raise ValueError(f"stream_max ({self.stream_max}) must be longer than the last stage ({self.stages[-1]} "
                             "segments): every stream would end after its first window, carrying nothing")


@dataclass
class TrainState:
    step: int = 0
    stage_index: int = 0
    seconds: float = 0.0
    tokens: int = 0
    window: list = field(default_factory=list)  # recent (correct, questions) of the current stage
    stage_seconds: float = 0.0  # training time when the current stage began


class Trainer:
    def __init__(self, model, codec: Codec, cfg: TrainConfig, out_dir: Path):
        self.model, self.codec, self.cfg, self.out = model, codec, cfg, Path(out_dir)
        self.S = model.config.segment_size
        vocab = model.base.vocab_size
        if cfg.probe_weight and not 0 <= cfg.probe_layer < model.n_layers:
            raise ValueError(f"probe_layer {cfg.probe_layer} is not a block of this {model.n_layers}-layer model")
        self.probe = (Probe(model.base.d_model, vocab, cfg.probe_layer).to(model.device, model.dtype)
                      if cfg.probe_weight else None)
        params = list(model.parameters()) + (list(self.probe.parameters()) if self.probe else [])
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        self.state = TrainState()
        self.rng = random.Random(cfg.seed)
        self.window: deque = deque(maxlen=20)
        self.streams = Streams(model, cfg.batch_size, cfg.stream_max, self.rng) if cfg.stream_max else None
        torch.manual_seed(cfg.seed)

    # ------------------------------------------------------------------ one step
    @property
    def stage(self) -> int:
        return self.cfg.stages[self.state.stage_index]

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then cosine decay over the budget (the last stretch anneals at a small rate)."""
        cfg = self.cfg
        warm = min(1.0, (step + 1) / cfg.warmup) if cfg.warmup > 0 else 1.0
        if cfg.decay == "none":
            return cfg.lr * warm
        if cfg.decay == "steps":
            progress = step / cfg.max_steps
        else:
            progress = self.state.seconds / (cfg.minutes * 60)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return cfg.lr * warm * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)

    def step(self) -> dict:
        cfg, st = self.cfg, self.state
        stage = self.stage
        if st.stage_index and self.rng.random() < cfg.replay:
            stage = self.cfg.stages[self.rng.randrange(st.stage_index)]
        self.model.train()
        batch, out, streaming = self._task_losses(stage)
        loss = out["answer"] + cfg.probe_weight * out.get("probe", 0.0) + cfg.ponder_tau * out.get("ponder", 0.0)
        tokens = batch.tokens
        if cfg.task != "ca" and (cfg.aux_batch_size or cfg.copy_batch_size):
            extra = aux_batch(self.codec, self.rng, cfg.aux_batch_size, self.S, cfg.copy_batch_size)
            aux = losses(self.model, self.probe, extra, self.probe is not None)
            loss = loss + aux["answer"] + cfg.probe_weight * aux.get("probe", 0.0)
            loss = loss + cfg.ponder_tau * aux.get("ponder", 0.0)  # an ACT model ponders over these samples too
            tokens += extra.tokens
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(st.step)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.opt.param_groups[0]["params"], cfg.clip)
        self.opt.step()
        if streaming:
            row_ages = self.streams.ages()
            self.streams.advance(out["memory"], -(-batch.ids.shape[1] // self.S))  # segments: ceil(T / S)
        st.step += 1
        st.tokens += tokens
        if stage == self.stage:
            self.window.append((out["correct"], out["questions"]))
        probe_loss = out["probe"].item() if "probe" in out else None
        row = {"step": st.step, "stage": stage, "lr": self.opt.param_groups[0]["lr"], "loss": loss.item(),
               "answer_loss": out["answer"].item(), "probe_loss": probe_loss,
               "acc": out["correct"] / out["questions"], "cell_acc": out["cells_correct"] / out["cells"],
               "grad_norm": float(norm), "tokens": tokens}
        if streaming:
            row["stream_age"] = round(sum(row_ages) / len(row_ages), 1)  # mean segments read before this window
        if "ponder" in out:
            row["ponder"] = round(out["ponder"].detach().item(), 4)
        return row

    def _task_losses(self, stage: int) -> tuple:
        """(batch, its losses, whether it continued the streams): in the last stage with memory streams, the next
        window of every stream, read from the memory the previous window left."""
        cfg = self.cfg
        if self.streams is not None and stage == cfg.stages[-1]:
            batch = self.streams.batch(self.codec, self.rng, stage, self.S, cfg.questions, cfg.ask_past)
            return batch, losses(self.model, None, batch, False, cfg.grad_segments, self.streams.start()), True
        batch = self._task_batch(stage)
        use_probe = self.probe is not None and stage <= cfg.probe_max_stage
        return batch, losses(self.model, self.probe, batch, use_probe, cfg.grad_segments), False

    def _task_batch(self, stage: int, n_tokens: int | None = None):
        cfg = self.cfg
        if cfg.task == "ca":
            return ca_batch(self.rng, cfg.batch_size, cfg.ca_k, cfg.ca_variant, context=cfg.ca_context)
        kw = {"distinct": True} if stage == 0 and cfg.dense_distinct and cfg.task == "qa1" else {}
        if cfg.task == "remember" and cfg.ask_past:
            kw = {"ask_past": cfg.ask_past}
        return task_batch(self.codec, self.rng, cfg.task, stage, cfg.batch_size, self.S, cfg.questions,
                          n_tokens=n_tokens, **kw)

    def _heldout(self, seed: int) -> dict:
        """Fresh documents of the current stage (QA: a separate generator; CA: the validation rules)."""
        cfg = self.cfg
        if cfg.task == "ca":
            return ca_accuracy(self.model, cfg.ca_k, cfg.ca_variant, cfg.heldout, split="validation", seed=seed)
        dense = self.stage == 0
        return accuracy(self.model, self.codec, cfg.task, max(self.stage, 1), cfg.heldout, split="train", seed=seed,
                        dense=dense, distinct=dense and cfg.dense_distinct and cfg.task == "qa1")

    def check_batches(self, rounds: int = 8) -> None:
        """`rounds` batches of every stage at its shortest length, and an auxiliary batch, from a generator of its
        own (training's stays untouched): options whose documents cannot be built (more questions than a segment
        holds, segments too short for the task) fail now, not when training draws such a document minutes later.
        Wording is random, so this is a sample, weighted to the worst case: a stage whose shortest documents pass
        eight rounds fails about never at the lengths training draws."""
        cfg = self.cfg
        rng, self.rng = self.rng, random.Random(0)
        try:
            if cfg.task != "ca" and (cfg.aux_batch_size or cfg.copy_batch_size):
                aux_batch(self.codec, self.rng, min(1, cfg.aux_batch_size), self.S, min(1, cfg.copy_batch_size))
            for stage in cfg.stages:
                shortest = None if cfg.task == "ca" else shortest_length(stage, self.S)
                for _ in range(rounds if shortest is not None else 1):
                    self._task_batch(stage, shortest)
        finally:
            self.rng = rng

    def running_accuracy(self) -> float:
        if len(self.window) < self.window.maxlen:
            return 0.0
        return sum(c for c, _ in self.window) / sum(q for _, q in self.window)

    def maybe_advance(self) -> dict | None:
        """Held-out check when the running accuracy passes; advance the stage when both pass, or when the stage
        has had `stage_minutes` (a time-boxed curriculum: a hard stage must not eat the whole budget)."""
        cfg, st = self.cfg, self.state
        last = st.stage_index + 1 == len(cfg.stages)
        if not last and cfg.stage_minutes and st.seconds - st.stage_seconds >= cfg.stage_minutes * 60:
            return self._advance({"step": st.step, "stage": self.stage, "timed_out": True})
        if st.step % (cfg.check_every * (5 if last else 1)) or self.running_accuracy() < cfg.advance_at:
            return None
        held = self._heldout(10_000 + st.step)
        event = {"step": st.step, "stage": self.stage, "heldout": held["accuracy"]}
        if held["accuracy"] >= cfg.advance_at and not last:
            self._advance(event)
        return event

    def _advance(self, event: dict) -> dict:
        st = self.state
        st.stage_index += 1
        st.stage_seconds = st.seconds
        self.window.clear()
        event["advanced_to"] = self.stage
        return event

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> None:
        """Everything needed to continue exactly: weights, probe, optimizer, curriculum, generators."""
        ckpt = self.out / "checkpoint"
        ckpt.mkdir(parents=True, exist_ok=True)
        self.state.window = list(self.window)
        blob = {"model": self.model.state_dict(), "probe": self.probe.state_dict() if self.probe else None,
                "opt": self.opt.state_dict(), "torch_rng": torch.get_rng_state(), "rng": self.rng.getstate(),
                "state": asdict(self.state), "config": asdict(self.cfg),
                "streams": self.streams.state_dict() if self.streams else None}
        tmp = ckpt / "trainer.pt.tmp"
        torch.save(blob, tmp)
        tmp.replace(ckpt / "trainer.pt")

    def load_checkpoint(self) -> bool:
        path = self.out / "checkpoint" / "trainer.pt"
        if not path.is_file():
            return False
        blob = torch.load(path, weights_only=False)
        self._check_same_run(blob.get("config", {}))
        try:
            self.model.load_state_dict(blob["model"])
        except RuntimeError as e:  # size mismatches: another model shape
            raise ValueError(f"{path} holds a model of another shape than this run's: {str(e)[:300]}") from None
        if self.probe is not None and blob["probe"] is not None:
            self.probe.load_state_dict(blob["probe"])
        self.opt.load_state_dict(blob["opt"])
        torch.set_rng_state(blob["torch_rng"])
        self.rng.setstate(_tuples(blob["rng"]))
        self.state = TrainState(**blob["state"])
        if self.streams is not None and blob.get("streams") is not None:
            self.streams.load_state_dict(blob["streams"])
        self.window = deque((tuple(x) for x in self.state.window), maxlen=20)
        return True

    def _check_same_run(self, saved: dict) -> None:
        """A checkpoint continues the run that wrote it: only the time and step budgets may change on resume."""
        now, saved = json.loads(json.dumps(asdict(self.cfg))), json.loads(json.dumps(saved))  # tuples == lists
        budget = {"minutes", "max_steps", "checkpoint_every"}
        if now["task"] != "ca":  # the CA options do not apply (and their defaults changed once)
            budget |= {k for k in now if k.startswith("ca_")}
        elif now.get("ca_variant") in ("oo", "shift") and saved.get("ca_k") == 1 and now["ca_k"] is None:
            saved["ca_k"] = None  # runs from before k = None: their default 1 was ignored by these variants
        changed = sorted(k for k in now.keys() - budget if k in saved and saved[k] != now[k])
        if changed:
            diff = ", ".join(f"{k} {saved[k]!r} -> {now[k]!r}" for k in changed[:6])
            raise ValueError(f"the checkpoint in {self.out / 'checkpoint'} is of another run ({diff}); resume with "
                             "its options, or train into another --out")

    # ------------------------------------------------------------------ loop
    def run(self, log, progress=None) -> None:
        """Train until `minutes` of training time or `max_steps`; log(dict) gets every step and event."""
        cfg, st = self.cfg, self.state
        last_ckpt = time.monotonic()
        while st.step < cfg.max_steps and st.seconds < cfg.minutes * 60:
            t0 = time.perf_counter()
            row = self.step()
            event = self.maybe_advance()
            st.seconds += time.perf_counter() - t0
            row.update(seconds=round(st.seconds, 2), running_acc=round(self.running_accuracy(), 4),
                       tokens_per_s=round(st.tokens / max(st.seconds, 1e-9)))
            log(row)
            if event:
                log({"event": "heldout", **event})
            if progress is not None:
                progress(row)
            if time.monotonic() - last_ckpt > cfg.checkpoint_every:
                self.save_checkpoint()
                last_ckpt = time.monotonic()
            if not math.isfinite(row["loss"]):
                raise FloatingPointError(f"loss became {row['loss']} at step {st.step}")
        self.save_checkpoint()


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def _step(row: str) -> float:
    """A log row's step; a torn row (a crash mid-write) counts as past every checkpoint."""
    try:
        return json.loads(row).get("step", 0)
    except (json.JSONDecodeError, AttributeError):
        return float("inf")


def write_log(path: Path, after_step: int | None = None):
    """An appending JSON-lines log. `after_step` (a resumed run): rows logged past that step first go, since the
    run continues from its checkpoint and logs those steps again."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if after_step is not None and path.is_file():
        rows = path.read_text(encoding="utf-8").splitlines()
        keep = next((i for i, row in enumerate(rows) if _step(row) > after_step), len(rows))
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(row + "\n" for row in rows[:keep]), encoding="utf-8")
        tmp.replace(path)
    f = path.open("a", encoding="utf-8")

    def log(row: dict) -> None:
        f.write(json.dumps(row) + "\n")
        f.flush()

    return log
