"""The training loop: sample a batch, forward, cross-entropy, backward, clip, AdamW step.

One step s (counted from 0) of `Trainer.train_step`:

    lr_s          = lr_at(s, lr, warmup_steps, steps, min_lr)          minilm.optim:lr_at
    x, y          = sample_batch(train tokens, B, T, data_rng)         minilm.data:sample_batch
    logits, cache = model.forward(x)                                   (B, T, V)
    loss          = cross_entropy(logits, y)                           minilm.ops.cross_entropy
    model.grads   = d loss / d params                                  model.backward (overwrites)
    ||g||         = clip_grad_norm(model.grads, grad_clip)             minilm.optim:clip_grad_norm
    params       <- AdamW(params, grads, lr_s)                         minilm.optim:AdamW.step

Determinism: everything random comes from two seeded numpy Generators, the model's initializer
(seed `seed`) and the data sampler (seed [seed, 1]); numpy's arithmetic is deterministic on one
machine, so the same seed gives bit-identical losses. A checkpoint stores the weights, AdamW's
moments and step count, the number of steps completed and the sampler's Generator state, so a run
resumed from step k computes exactly the losses k, k+1, ... of the run that was never stopped.
Validation never touches the sampler: it uses fixed, evenly spaced windows of the validation text
(minilm.data:eval_windows), so how often it runs does not change the training trajectory.

Metrics: the validation loss in nats per byte and bits per byte (= nats / ln 2, since a token is a
byte), against the unigram baseline (the cross-entropy of byte frequencies, which a model that
ignores context cannot beat).

Shapes legend: B batch, T time (sequence length), V vocabulary size.
"""
import dataclasses
import math
import os
import sys
import time

import numpy as np

from minilm import data
from minilm.checkpoint import CHECKPOINT_FILE, CheckpointError, load_checkpoint, resolve_path, save_checkpoint
from minilm.model import LM
from minilm.ops import cross_entropy
from minilm.optim import AdamW, clip_grad_norm, lr_at


class TrainingDiverged(RuntimeError):
    """The loss or the gradient became NaN / Inf; the last checkpoint is left as it was."""


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a training run. Defaults: a short run of a small byte-level model."""

    steps: int = 2000                  # total optimizer steps of the run (the cosine ends here)
    batch_size: int = 16               # B sequences per step
    seq_len: int = 128                 # T tokens per sequence
    lr: float = 3e-3                   # peak learning rate (after warmup)
    min_lr: float = 3e-4               # learning rate at the end of the cosine
    warmup_steps: int = 100            # linear warmup from lr / warmup_steps to lr
    weight_decay: float = 0.1          # AdamW decoupled decay of projection matrices
    decay_embeddings: bool = False     # also decay the embedding table
    beta1: float = 0.9                 # AdamW first-moment decay
    beta2: float = 0.95                # AdamW second-moment decay
    eps: float = 1e-8                  # AdamW denominator epsilon
    grad_clip: float = 1.0             # global gradient-norm clip; 0 disables
    eval_interval: int = 200           # validate every this many steps (and at the end); 0 = only at the end
    eval_batches: int = 8              # validation batches (of B windows of T tokens) per evaluation
    save_interval: int = 500           # checkpoint every this many steps (and at the end); 0 = only at the end
    val_fraction: float = 0.1          # the last fraction of the text held out for validation
    seed: int = 0                      # model initialization and batch sampling
    data: str = None                   # text file to train on; None = the built-in corpus

    # fields that change the trajectory of a run: a resumed run must keep them
    TRAJECTORY = ("batch_size", "seq_len", "lr", "min_lr", "warmup_steps", "weight_decay", "decay_embeddings",
                  "beta1", "beta2", "eps", "grad_clip", "val_fraction", "seed")

    def __post_init__(self):
        self.validate()

    def validate(self):
        """Raise ValueError naming the field for any setting out of range."""
        for name in ("steps", "batch_size", "seq_len", "eval_batches"):
            _check_int(name, getattr(self, name), 1)
        for name in ("warmup_steps", "eval_interval", "save_interval", "seed"):
            _check_int(name, getattr(self, name), 0)
        for name in ("lr", "eps"):
            _check_real(name, getattr(self, name), lower=0.0, strict=True)
        for name in ("min_lr", "weight_decay", "grad_clip"):
            _check_real(name, getattr(self, name), lower=0.0)
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr must be <= lr = {self.lr}, got {self.min_lr}")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            _check_real(name, value, lower=0.0)
            if value >= 1:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        _check_real("val_fraction", self.val_fraction, lower=0.0, strict=True)
        if self.val_fraction >= 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if not isinstance(self.decay_embeddings, bool):
            raise ValueError(f"decay_embeddings must be a bool, got {self.decay_embeddings!r}")
        if self.data is not None and not isinstance(self.data, str):
            raise ValueError(f"data must be a path (str) or None, got {self.data!r}")

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"training config has unknown field(s) {unknown}")
        return cls(**d)


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_real(name, value, lower, strict=False):
    ok = not isinstance(value, bool) and isinstance(value, (int, float, np.floating, np.integer)) \
        and math.isfinite(value) and (value > lower if strict else value >= lower)
    if not ok:
        raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {lower}, got {value!r}")


@dataclasses.dataclass
class TrainResult:
    """What a run returns. losses[i] is the training loss of step first_step + i."""

    first_step: int
    last_step: int                     # steps completed when the run ended
    losses: list
    val_history: list                  # [(step, val loss in nats)], step = steps completed
    val_loss: float
    val_bpb: float
    unigram_bpb: float
    tokens_per_second: float
    seconds: float
    checkpoint: str
    summary: str


def evaluate(model, tokens, batch_size, seq_len, max_batches):
    """Mean cross-entropy (nats per byte) over the fixed validation windows (minilm.data:eval_windows)."""
    total, count = 0.0, 0
    for x, y in data.eval_windows(tokens, batch_size, seq_len, max_batches):
        logits, _ = model.forward(x)
        loss, _ = cross_entropy.forward(logits, y)
        total += float(loss) * y.size
        count += y.size
    return total / count


def _format_duration(seconds):
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _format_count(n):
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}" if isinstance(n, float) else str(n)


class Trainer:
    """Holds a run: model, optimizer, data, sampler RNG and the number of steps completed.

    Build one with `Trainer.new(model_cfg, train_cfg)` or `Trainer.resume(path, ...)`; then
    `run()` trains to train_cfg.steps (or `stop_at`), validating and checkpointing on the way.
    """

    def __init__(self, model, train_cfg, corpus, optimizer, rng, step=0):
        self.model, self.cfg, self.corpus = model, train_cfg, corpus
        self.optimizer, self.rng, self.step = optimizer, rng, step
        self.saved = None                      # (path, step) of the last checkpoint written or resumed from
        data.check_length(corpus.train, train_cfg.seq_len, "training text")
        data.check_length(corpus.val, train_cfg.seq_len, "validation text")
        self.unigram_nats = data.unigram_entropy(corpus.val, reference=corpus.train)

    # -- building -------------------------------------------------------------------------------

    @staticmethod
    def load_data(train_cfg):
        return data.load_corpus(train_cfg.data, train_cfg.val_fraction, min_tokens=train_cfg.seq_len + 1)

    @staticmethod
    def make_optimizer(model, train_cfg):
        return AdamW(model.params, lr=train_cfg.lr, betas=(train_cfg.beta1, train_cfg.beta2), eps=train_cfg.eps,
                     weight_decay=train_cfg.weight_decay, decay_embeddings=train_cfg.decay_embeddings)

    @classmethod
    def new(cls, model_cfg, train_cfg, corpus=None):
        """A fresh run: model initialized from train_cfg.seed, the sampler seeded from [seed, 1]."""
        if model_cfg.vocab_size != data.VOCAB_SIZE:
            raise ValueError(f"vocab_size must be {data.VOCAB_SIZE} for byte-level text, got {model_cfg.vocab_size}")
        corpus = cls.load_data(train_cfg) if corpus is None else corpus
        model = LM(model_cfg, seed=train_cfg.seed)
        rng = np.random.default_rng([train_cfg.seed, 1])
        return cls(model, train_cfg, corpus, cls.make_optimizer(model, train_cfg), rng)

    @classmethod
    def resume(cls, path, train_cfg=None, model_cfg=None, corpus=None):
        """Continue the run saved at `path` (a checkpoint file or a directory holding one).

        train_cfg: None keeps the stored training config; otherwise the settings that change the
        trajectory (TrainConfig.TRAJECTORY) must equal the stored ones, while steps and the
        evaluation / checkpoint intervals may change (more steps stretch the cosine from here on).
        model_cfg: when given, the stored model config must equal it.
        """
        state = load_checkpoint(path, expected_config=model_cfg)
        if state.optimizer is None or state.rng_state is None or state.train_config is None:
            raise CheckpointError(f"checkpoint {path} holds a model only (no optimizer, step or RNG state); "
                                  f"it cannot be resumed")
        try:
            stored = TrainConfig.from_dict(state.train_config)
        except (ValueError, TypeError) as err:
            raise CheckpointError(f"checkpoint {path} has an invalid training config: {err}") from None
        if train_cfg is None:
            train_cfg = stored
        else:
            differences = [f"{name}: {getattr(stored, name)!r} != {getattr(train_cfg, name)!r}"
                           for name in TrainConfig.TRAJECTORY if getattr(stored, name) != getattr(train_cfg, name)]
            if differences:
                raise CheckpointError(f"cannot resume {path} with different training settings "
                                      f"(stored != requested: {'; '.join(differences)})")
        if state.step > train_cfg.steps:
            raise ValueError(f"the checkpoint has already done {state.step} steps, more than steps = {train_cfg.steps}")
        corpus = cls.load_data(train_cfg) if corpus is None else corpus
        recorded = state.stats.get("data_tokens")
        if recorded is not None and recorded != len(corpus.tokens):
            raise CheckpointError(f"checkpoint {path} was trained on a text of {recorded} bytes, the data given "
                                  f"has {len(corpus.tokens)} bytes; resume with the same --data")
        optimizer = cls.make_optimizer(state.model, train_cfg)
        optimizer.load_state_dict(state.optimizer)
        trainer = cls(state.model, train_cfg, corpus, optimizer, state.make_rng(), step=state.step)
        trainer.saved = (resolve_path(path), state.step)
        return trainer

    # -- one step -------------------------------------------------------------------------------

    @property
    def tokens_per_step(self):
        return self.cfg.batch_size * self.cfg.seq_len

    def lr(self, step):
        cfg = self.cfg
        return lr_at(step, cfg.lr, cfg.warmup_steps, cfg.steps, cfg.min_lr)

    def train_step(self):
        """One optimizer step. Returns (loss, gradient norm before clipping, learning rate)."""
        cfg, model = self.cfg, self.model
        lr = self.lr(self.step)
        x, y = data.sample_batch(self.corpus.train, cfg.batch_size, cfg.seq_len, self.rng)
        try:
            logits, cache = model.forward(x)
            loss, loss_cache = cross_entropy.forward(logits, y)
            dlogits, _ = cross_entropy.backward(1.0, loss_cache)
            model.backward(dlogits, cache)
        except ValueError as err:
            # the ops refuse NaN / Inf inputs: an activation overflowed somewhere in the model
            if "NaN or Inf" not in str(err):
                raise
            raise TrainingDiverged(f"training diverged at step {self.step} ({err}); try a lower --lr") from None
        grad_norm = clip_grad_norm(model.grads, cfg.grad_clip)
        if not math.isfinite(grad_norm):
            raise TrainingDiverged(f"the gradient became NaN or Inf at step {self.step}; try a lower --lr")
        self.optimizer.step(model.params, model.grads, lr=lr)
        self.step += 1
        return float(loss), grad_norm, lr

    def evaluate(self):
        return evaluate(self.model, self.corpus.val, self.cfg.batch_size, self.cfg.seq_len, self.cfg.eval_batches)

    def save(self, path, stats=None):
        """Write a training checkpoint (atomically) to `path`, a file or directory."""
        stats = dict(stats or {}, data_tokens=int(len(self.corpus.tokens)), data_name=self.corpus.name)
        save_checkpoint(path, self.model, self.optimizer, self.step, self.rng, self.cfg.to_dict(), stats)
        self.saved = (os.fspath(path), self.step)

    # -- the loop -------------------------------------------------------------------------------

    def run(self, out_dir=None, progress=True, stop_at=None, log=None):
        """Train from the current step to cfg.steps (or to `stop_at` steps, as if interrupted there).

        out_dir: directory for the checkpoint (created if needed; the file is CHECKPOINT_FILE), saved
        every save_interval steps and at the end; None saves nothing. progress: show a tqdm bar on
        stderr. log: a function given one line at each validation (default: tqdm.write when
        progress, else nothing). Returns a TrainResult whose `summary` is the final one-line summary.
        """
        from tqdm import tqdm

        cfg = self.cfg
        end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
        first_step = self.step
        checkpoint_path = None
        if out_dir is not None:
            os.makedirs(out_dir, exist_ok=True)
            checkpoint_path = os.path.join(out_dir, CHECKPOINT_FILE)
        if log is None:
            log = tqdm.write if progress else (lambda line: None)

        losses, val_history = [], []
        train_seconds = 0.0
        start_time = time.perf_counter()
        bar = tqdm(total=cfg.steps * self.tokens_per_step, initial=first_step * self.tokens_per_step,
                   unit="tok", unit_scale=True, dynamic_ncols=True, disable=not progress, file=sys.stderr,
                   desc=f"{self.model.cfg.schedule} step {first_step}/{cfg.steps}", leave=True)
        try:
            while self.step < end:
                t0 = time.perf_counter()
                loss, grad_norm, lr = self.train_step()
                train_seconds += time.perf_counter() - t0
                losses.append(loss)
                bar.set_description(f"{self.model.cfg.schedule} step {self.step}/{cfg.steps}", refresh=False)
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}", refresh=False)
                bar.update(self.tokens_per_step)
                at_end = self.step == end
                if (cfg.eval_interval and self.step % cfg.eval_interval == 0) or at_end:
                    val = self.evaluate()
                    val_history.append((self.step, val))
                    log(f"step {self.step}: train loss {loss:.4f}, val loss {val:.4f} "
                        f"({data.bits_per_byte(val):.3f} bits/byte)")
                if checkpoint_path and ((cfg.save_interval and self.step % cfg.save_interval == 0) or at_end):
                    self.save(checkpoint_path, {"train_loss": loss,
                                                "val_loss": val_history[-1][1] if val_history else None})
        finally:
            bar.close()

        seconds = time.perf_counter() - start_time
        val = val_history[-1][1] if val_history else self.evaluate()
        tokens = len(losses) * self.tokens_per_step
        tokens_per_second = tokens / train_seconds if train_seconds > 0 else float("nan")
        summary = (f"{self.model.cfg.schedule}: {_format_count(self.model.num_params())} params, "
                   f"steps {first_step}->{self.step} of {cfg.steps} ({_format_count(tokens)} tokens) in "
                   f"{_format_duration(seconds)}, {_format_count(tokens_per_second)} tok/s | "
                   f"train loss {losses[-1] if losses else float('nan'):.4f} | val loss {val:.4f} = "
                   f"{data.bits_per_byte(val):.3f} bits/byte (unigram {data.bits_per_byte(self.unigram_nats):.3f})"
                   + (f" | saved {checkpoint_path}" if checkpoint_path else ""))
        return TrainResult(first_step=first_step, last_step=self.step, losses=losses, val_history=val_history,
                           val_loss=val, val_bpb=data.bits_per_byte(val),
                           unigram_bpb=data.bits_per_byte(self.unigram_nats),
                           tokens_per_second=tokens_per_second, seconds=seconds, checkpoint=checkpoint_path,
                           summary=summary)


def train(model_cfg, train_cfg, corpus=None, out_dir=None, progress=False, stop_at=None):
    """Train a fresh model; returns (model, TrainResult). See Trainer.run for the arguments."""
    trainer = Trainer.new(model_cfg, train_cfg, corpus)
    result = trainer.run(out_dir=out_dir, progress=progress, stop_at=stop_at)
    return trainer.model, result
