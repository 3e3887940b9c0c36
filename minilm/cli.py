"""The `minilm` command: check the identities, train a model, generate text, inspect a checkpoint.

    minilm check
    minilm train --schedule MMMA --d-model 128 --steps 2000 [--data FILE] --out DIR
    minilm train --resume DIR [--steps 4000]
    minilm generate --ckpt DIR --prompt "The " --tokens 200
    minilm info --ckpt DIR
    minilm tour [--quick] [--out DIR]

Errors (a missing file, a bad schedule letter, a corrupt checkpoint, a bad option) print one line to
stderr and exit with status 2; Ctrl-C exits with status 130. Nothing prints a traceback.
"""
import argparse
import os
import sys
import time

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130

# LMConfig fields settable from `minilm train`, with their command-line type and help.
MODEL_OPTIONS = [
    ("schedule", str, "MMMA", "one letter per layer: A softmax attention, L linear attention, G gated linear "
                              "attention, M Mamba, R RWKV-4, S LSTM; e.g. AAAA (Transformer), MMMM (Mamba), "
                              "MMMA (Jamba-style hybrid)"),
    ("d_model", int, 128, "model width D (the residual stream)"),
    ("n_heads", int, 4, "heads of the A, L and G layers (must divide d_model)"),
    ("mlp_ratio", int, 4, "MLP / RWKV channel-mix hidden width = mlp_ratio * d_model"),
    ("d_state", int, 16, "Mamba state size N per channel"),
    ("d_conv", int, 4, "Mamba causal convolution taps"),
    ("expand", int, 2, "Mamba inner channels = expand * d_model"),
    ("short_conv", int, 0, "taps of a causal depthwise conv on the A/L/G mixer input (0 = none)"),
    ("chunk_size", int, 64, "chunk length of the chunked linear-attention and scan forms"),
    ("dtype", str, "float32", "float32 or float64 for the whole model"),
    ("backend", str, "auto", "kernels for attention / linear attention / scan: auto, numpy, numba or cuda"),
]

# TrainConfig fields settable from `minilm train`.
TRAIN_OPTIONS = [
    ("steps", int, 2000, "total optimizer steps of the run; the cosine schedule ends here"),
    ("batch_size", int, 16, "sequences per step"),
    ("seq_len", int, 128, "tokens (bytes) per sequence"),
    ("lr", float, 3e-3, "peak learning rate, reached after the warmup"),
    ("min_lr", float, None, "learning rate at the end of the cosine (default lr / 10)"),
    ("warmup_steps", int, 100, "steps of linear learning-rate warmup"),
    ("weight_decay", float, 0.1, "AdamW decoupled weight decay of the projection matrices"),
    ("beta1", float, 0.9, "AdamW first-moment decay"),
    ("beta2", float, 0.95, "AdamW second-moment decay"),
    ("eps", float, 1e-8, "AdamW denominator epsilon"),
    ("grad_clip", float, 1.0, "clip the global gradient norm to this value (0 = no clipping)"),
    ("eval_interval", int, 200, "validate every this many steps and at the end (0 = only at the end)"),
    ("eval_batches", int, 8, "validation batches per evaluation"),
    ("save_interval", int, 500, "write the checkpoint every this many steps and at the end (0 = only at the end)"),
    ("val_fraction", float, 0.1, "fraction of the text (its end) held out for validation"),
    ("seed", int, 0, "seed of the model initialization and the batch sampling"),
]


class OneLineParser(argparse.ArgumentParser):
    """argparse with usage errors reported on one line (and exit status 2)."""

    def error(self, message):
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _option(name):
    return "--" + name.replace("_", "-")


def _human_bytes(n):
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


# ----------------------------------------------------------------------------------------------
# minilm check

def cmd_check(args):
    from minilm.identities import run_all
    rows = run_all(seed=args.seed)
    width = max(len(name) for name, _, _ in rows)
    failed = 0
    for name, diff, tol in rows:
        ok = diff <= tol
        failed += not ok
        print(f"{name:<{width}}  max|diff| = {diff:.2e}  (tol {tol:.0e})  {'ok' if ok else 'FAILED'}")
    print(f"{len(rows) - failed} of {len(rows)} identities hold (float64, seed {args.seed})")
    return 1 if failed else 0


# ----------------------------------------------------------------------------------------------
# minilm train

def _given(args, names):
    """{field: value} for the options the user actually passed (argparse defaults are None)."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _train_settings(args, stored=None):
    """The TrainConfig for this command: the defaults (or the stored config of a resumed run), then
    the options given. min_lr follows lr (lr / 10) unless it is given too."""
    from minilm.train import TrainConfig
    settings = {name: default for name, _, default, _ in TRAIN_OPTIONS} if stored is None else dict(stored)
    given = _given(args, [name for name, *_ in TRAIN_OPTIONS])
    settings.update(given)
    if "min_lr" not in given and (stored is None or "lr" in given):
        settings["min_lr"] = settings["lr"] / 10
    if args.decay_embeddings:
        settings["decay_embeddings"] = True
    if args.data is not None:
        settings["data"] = os.path.abspath(args.data)
    return TrainConfig(**settings)


def cmd_train(args):
    from minilm.checkpoint import CHECKPOINT_FILE, load_checkpoint
    from minilm.model import LMConfig
    from minilm.train import Trainer

    model_given = _given(args, [name for name, *_ in MODEL_OPTIONS])
    if args.resume is not None:
        stored = load_checkpoint(args.resume)
        if stored.train_config is None:
            raise ValueError(f"{args.resume} holds a model only (no optimizer or data state); it cannot be resumed")
        expected = LMConfig.from_dict(dict(stored.model.cfg.to_dict(), **model_given))
        train_cfg = _train_settings(args, stored.train_config)
        trainer = Trainer.resume(args.resume, train_cfg=train_cfg, model_cfg=expected)
        out_dir = args.out if args.out is not None else (
            args.resume if os.path.isdir(args.resume) else os.path.dirname(os.path.abspath(args.resume)))
        print(f"resuming {trainer.model.cfg.schedule} from step {trainer.step} of {train_cfg.steps}")
    else:
        defaults = {name: default for name, _, default, _ in MODEL_OPTIONS}
        model_cfg = LMConfig(**dict(defaults, **model_given))
        train_cfg = _train_settings(args)
        out_dir = args.out if args.out is not None else "out"
        existing = os.path.join(out_dir, CHECKPOINT_FILE)
        if os.path.exists(existing) and not args.force:
            raise ValueError(f"{existing} exists; continue it with --resume {out_dir}, or pass --force to overwrite it")
        trainer = Trainer.new(model_cfg, train_cfg)
        print(f"training {model_cfg.schedule} ({trainer.model.num_params():,} parameters) on {trainer.corpus.name}: "
              f"{len(trainer.corpus.train):,} train / {len(trainer.corpus.val):,} validation bytes")
    sys.stdout.flush()
    progress = not args.no_progress
    try:
        result = trainer.run(out_dir=out_dir, progress=progress, log=None if progress else print)
    except KeyboardInterrupt:
        where = (f"the checkpoint of step {trainer.saved[1]} is {trainer.saved[0]}; continue with "
                 f"minilm train --resume {trainer.saved[0]}") if trainer.saved else "no checkpoint was written"
        print(f"minilm train: interrupted at step {trainer.step}; {where}", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(result.summary)
    return 0


# ----------------------------------------------------------------------------------------------
# minilm generate

def cmd_generate(args):
    from minilm import data
    from minilm.checkpoint import load_checkpoint

    model = load_checkpoint(args.ckpt).model
    prompt = data.encode(args.prompt)
    if prompt.size == 0:
        raise ValueError("--prompt must not be empty (the model continues a prompt of at least one byte)")
    if model.cfg.vocab_size != data.VOCAB_SIZE:
        raise ValueError(f"the checkpoint's vocab_size is {model.cfg.vocab_size}, not the byte vocabulary "
                         f"({data.VOCAB_SIZE}); it cannot generate text")
    start = time.perf_counter()
    tokens = model.generate(prompt, args.tokens, temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    seconds = time.perf_counter() - start
    sys.stdout.write(data.decode(tokens if args.echo_prompt else tokens[prompt.size:]) + "\n")
    if args.timing:
        per_token = 1000 * seconds / max(1, args.tokens)
        print(f"{args.tokens} tokens in {seconds:.2f} s ({per_token:.2f} ms/token, prompt of {prompt.size} bytes "
              f"included)", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------------------------
# minilm info

def cmd_info(args):
    from minilm import data
    from minilm.checkpoint import load_checkpoint, resolve_path

    state = load_checkpoint(args.ckpt)
    model, cfg = state.model, state.model.cfg
    print(f"checkpoint {resolve_path(args.ckpt)}")
    print(f"model: schedule {cfg.schedule}, d_model {cfg.d_model}, {cfg.n_layers} layers, vocab {cfg.vocab_size}, "
          f"{cfg.dtype}, {model.num_params():,} parameters")
    if state.train_config is not None:
        line = f"training: {state.step} of {state.train_config.get('steps')} steps"
        val = state.stats.get("val_loss")
        if val is not None:
            line += f", val loss {val:.4f} ({data.bits_per_byte(val):.3f} bits/byte)"
        if state.stats.get("data_name"):
            line += f", data {state.stats['data_name']}"
        print(line)

    counts = model.param_counts()
    rows = model.layer_info()
    print()
    print(f"{'part':<10} {'family':<24} {'params':>10} {'state/sequence':>15} {'state/token':>12}")
    print(f"{'embed':<10} {'token embedding':<24} {counts.get('embed', 0):>10,}")
    for row in rows:
        family = f"{row['letter']} {row['family']}"
        print(f"{'layers.' + str(row['layer']):<10} {family:<24} {row['params']:>10,} "
              f"{_human_bytes(row['state_bytes_per_sequence']):>15} {_human_bytes(row['state_bytes_per_token']):>12}")
    print(f"{'norm_f':<10} {'final RMSNorm':<24} {counts.get('norm_f', 0):>10,}")
    if "head" in counts:
        print(f"{'head':<10} {'output projection':<24} {counts['head']:>10,}")
    fixed = sum(row["state_bytes_per_sequence"] for row in rows)
    per_token = sum(row["state_bytes_per_token"] for row in rows)
    print(f"{'total':<10} {'':<24} {model.num_params():>10,} {_human_bytes(fixed):>15} {_human_bytes(per_token):>12}")
    print()
    print("decoding state of one sequence (fixed part + part that grows with the context):")
    for context in (256, 4096, 65536):
        print(f"  context {context:>6} tokens: {_human_bytes(fixed + per_token * context)}")
    if per_token == 0:
        print("  no layer keeps a KV cache: the state does not grow with the context")
    else:
        growing = "".join(sorted({row["letter"] for row in rows if row["state_bytes_per_token"]}))
        print(f"  the {growing} layers' KV cache grows by {_human_bytes(per_token)} per token")
    return 0


# ----------------------------------------------------------------------------------------------
# minilm tour

def cmd_tour(args):
    from minilm.experiments.tour import run_tour
    result = run_tour(quick=args.quick, out_dir=args.out, progress=True)
    for line in result.verdict_lines:
        print(line)
    print(f"took {result.elapsed_s:.0f} s of a {result.budget_s:.0f} s budget; report: {result.report_path}, "
          f"numbers: {result.results_path}")
    return 0


# ----------------------------------------------------------------------------------------------
# the parser

def add_train_parser(sub):
    train = sub.add_parser(
        "train", help="train a byte-level language model (built-in corpus or --data FILE)",
        description="Train a byte-level language model with AdamW, warmup + cosine learning rate and gradient "
                    "clipping. Shows a progress bar with loss, tokens/s and ETA, validates on the held-out end "
                    "of the text (loss and bits per byte), and writes DIR/checkpoint.npz atomically. A run is "
                    "deterministic: the same seed gives the same losses, and --resume continues exactly as if it "
                    "had not stopped.")
    model = train.add_argument_group("model (ignored with --resume unless given; then it must match the checkpoint)")
    for name, kind, default, text in MODEL_OPTIONS:
        model.add_argument(_option(name), type=kind, default=None, metavar=name.upper(),
                           help=f"{text} (default {default})")
    run = train.add_argument_group("training (with --resume, only --steps and the intervals may change)")
    for name, kind, default, text in TRAIN_OPTIONS:
        run.add_argument(_option(name), type=kind, default=None, metavar=name.upper(),
                         help=text if default is None else f"{text} (default {default})")
    run.add_argument("--decay-embeddings", action="store_true",
                     help="also apply weight decay to the embedding table (default: no decay on embeddings, "
                          "norms, biases, A_log, D)")
    io = train.add_argument_group("data and output")
    io.add_argument("--data", metavar="FILE", default=None,
                    help="text file to train on, read as bytes (default: the built-in corpus, the Python "
                         "reference documentation topics shipped with CPython as pydoc_data.topics)")
    io.add_argument("--out", metavar="DIR", default=None,
                    help="directory for checkpoint.npz (default: out, or the --resume directory)")
    io.add_argument("--resume", metavar="DIR", default=None,
                    help="continue the run saved in DIR (a directory with checkpoint.npz, or the file)")
    io.add_argument("--force", action="store_true", help="overwrite an existing checkpoint in --out")
    io.add_argument("--no-progress", action="store_true", help="do not show the progress bar")
    train.set_defaults(func=cmd_train)


def add_generate_parser(sub):
    generate = sub.add_parser(
        "generate", help="sample text from a trained checkpoint",
        description="Continue a prompt with a trained model: the prompt runs through the parallel form once "
                    "(prefill), then each new byte costs one recurrent step (a KV cache for A layers, a "
                    "fixed-size state for the others). Prints the prompt and its continuation.")
    generate.add_argument("--ckpt", metavar="DIR", required=True,
                          help="checkpoint directory (or checkpoint file) written by minilm train")
    generate.add_argument("--prompt", default="The ", help="text to continue (default %(default)r)")
    generate.add_argument("--tokens", type=int, default=200, metavar="N",
                          help="number of bytes to generate (default %(default)s)")
    generate.add_argument("--temperature", type=float, default=1.0, metavar="T",
                          help="divide the logits by T before sampling; 0 = greedy (default %(default)s)")
    generate.add_argument("--top-k", type=int, default=None, metavar="K",
                          help="sample only among the K most likely bytes (default: all)")
    generate.add_argument("--seed", type=int, default=0,
                          help="seed of the sampler; the same seed gives the same text (default %(default)s)")
    generate.add_argument("--no-echo-prompt", dest="echo_prompt", action="store_false",
                          help="print only the continuation, not the prompt before it")
    generate.add_argument("--timing", action="store_true",
                          help="also report the generation time per token on stderr")
    generate.set_defaults(func=cmd_generate)


def add_info_parser(sub):
    info = sub.add_parser(
        "info", help="describe a checkpoint: parameters per layer, decoding state per token vs per sequence",
        description="Print a checkpoint's config, training progress, the parameters of each layer, and the "
                    "bytes of decoding state each layer keeps per sequence (fixed) and per token of context "
                    "(the KV cache of softmax-attention layers).")
    info.add_argument("--ckpt", metavar="DIR", required=True,
                      help="checkpoint directory (or checkpoint file) written by minilm train")
    info.set_defaults(func=cmd_info)


def add_tour_parser(sub):
    tour = sub.add_parser(
        "tour", help="measure every claim of the O(N^2)-vs-O(N) debate and write a report",
        description="Run the experiments behind each claim (scaling of time and memory with the sequence "
                    "length, decoding cost per token, recall of small trained models, training stability of "
                    "linear attention) with a progress bar, and write DIR/report.md (each claim, its figure and "
                    "a verdict computed from the numbers), PNG plots and DIR/results.json.")
    tour.add_argument("--quick", action="store_true",
                      help="smaller sizes and a reduced recall sweep: about 5 minutes on 2 CPU cores "
                           "(default: about 30 minutes)")
    tour.add_argument("--out", metavar="DIR", default="minilm-tour",
                      help="directory for the report, plots and results (default %(default)s)")
    tour.set_defaults(func=cmd_tour)


def build_parser():
    parser = OneLineParser(prog="minilm", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    check = sub.add_parser("check", help="verify the identities behind O(N) attention on random inputs",
                           description="Verify the identities behind O(N) attention on random inputs.")
    check.add_argument("--seed", type=int, default=0, help="random seed for the inputs (default 0)")
    check.set_defaults(func=cmd_check)
    add_train_parser(sub)
    add_generate_parser(sub)
    add_info_parser(sub)
    add_tour_parser(sub)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    from minilm.ops._backend import BackendUnavailable
    from minilm.train import TrainingDiverged
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"minilm {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, TypeError, OSError, BackendUnavailable, TrainingDiverged) as err:
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"minilm {args.command}: error: {message}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
