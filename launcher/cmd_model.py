"""Using a checkpoint without exporting it: `zeroray sample` (text from a prompt) and `zeroray eval` (loss,
perplexity and bits per byte on a corpus). Both load zeroray's own module with the checkpoint's weights
(launcher.export.load_module: any ZeRO stage, read weights-only) and the run's tokenizer."""

from __future__ import annotations

import json
import sys

DEEPSPEED = {"sample", "eval"}  # loading a checkpoint imports DeepSpeed

TARGET_HELP = ("a run directory (its latest checkpoint), a checkpoint folder (RUN/checkpoints/step_N) or a run "
               "directory at an fsspec URL (s3://bucket/runs/NAME)")


def add_commands(sub) -> None:
    sample = sub.add_parser(
        "sample", help="generate text from a checkpoint (no export needed)",
        description="Continue a prompt with a run's model: greedy (--temperature 0) or temperature and nucleus "
        "(top-p) sampling, reproducible with --seed. Decoder models continue the text as a new document; "
        "encoder–decoder models (Charformer, span corruption) fill in the span after the prompt. Decodes "
        "with a key/value cache (except an MoE that drops tokens by capacity: the whole prefix each step).",
    )
    sample.add_argument("target", metavar="RUN|CHECKPOINT", help=TARGET_HELP)
    sample.add_argument("--prompt", required=True, help="text to continue")
    sample.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="tokens to add (default 64)")
    sample.add_argument("--temperature", type=float, default=0.8, metavar="T",
                        help="softmax temperature; 0 = greedy (default 0.8)")
    sample.add_argument("--top-p", type=float, default=0.95, metavar="P",
                        help="nucleus sampling: draw from the most likely tokens holding P of the probability "
                        "(default 0.95; 1 = all)")
    sample.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the draws (default 0)")
    sample.add_argument("--num-samples", type=int, default=1, metavar="K", help="continuations to draw (default 1)")
    sample.add_argument("--step", type=int, default=None, help="checkpoint step of a run (default: the latest)")
    sample.add_argument("--json", action="store_true", help="print JSON (prompt, samples, token ids)")

    ev = sub.add_parser(
        "eval", help="loss, perplexity and bits per byte of a checkpoint on a corpus",
        description="Score a run's model on held-out text (a file, folder, glob or URL, read like data.sources) "
        "through the run's tokenizer, packing and objective: every window of one pass. Bits per byte = summed "
        "token NLL / (ln 2 × UTF-8 bytes of the text those tokens stand for), comparable across tokenizers.",
    )
    ev.add_argument("target", metavar="RUN|CHECKPOINT", help=TARGET_HELP)
    ev.add_argument("--data", required=True, metavar="PATH", help="held-out corpus (local path or URL)")
    ev.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    ev.add_argument("--max-windows", type=int, default=None, metavar="N",
                    help="score only the first N windows (default: the whole corpus)")
    ev.add_argument("--step", type=int, default=None, help="checkpoint step of a run (default: the latest)")
    ev.add_argument("--json", action="store_true", help="print JSON instead of lines")


def cmd_sample(args) -> int:
    from launcher.export import load_module
    from trainer.samples import sample_texts

    module, found = load_module(args.target, args.step)
    samples = sample_texts(module, found.spec, args.prompt, args.max_new_tokens, args.temperature, args.top_p,
                           args.seed, args.num_samples)
    if args.json:
        print(json.dumps({"checkpoint": str(found.ckpt.path), "step": found.ckpt.step, "prompt": args.prompt,
                          "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed,
                          "samples": samples}, indent=2))
        return 0
    print(f"zeroray: {found.spec.model.name} at step {found.ckpt.step} ({found.ckpt.path})", file=sys.stderr)
    for i, s in enumerate(samples):
        if len(samples) > 1:
            print(f"--- sample {i + 1} (seed {args.seed + i})")
        print(args.prompt + s["text"])
    return 0


def cmd_eval(args) -> int:
    from launcher.export import load_module
    from trainer.errors import ZerorayError
    from trainer.evaluation import corpus_metrics

    if args.batch_size < 1 or (args.max_windows is not None and args.max_windows < 1):
        raise ZerorayError("--batch-size and --max-windows must be at least 1")
    module, found = load_module(args.target, args.step)
    result = corpus_metrics(module, found.spec, args.data, args.batch_size, args.max_windows)
    result = {"checkpoint": str(found.ckpt.path), "step": found.ckpt.step, "model": found.spec.model.name,
              "data": args.data, "objective": found.spec.data.objective.kind, **result}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    bpb = result["bits_per_byte"]
    print(f"{result['model']} at step {result['step']} on {args.data} ({result['windows']} windows, "
          f"{result['tokens']:,} scored tokens, {result['bytes']:,} bytes)")
    print(f"  loss            {result['loss']:.4f}")
    print(f"  perplexity      {result['perplexity']:.3f}")
    print(f"  bits per byte   {'–' if bpb is None else f'{bpb:.4f}'}")
    return 0


COMMANDS = {("sample", None): cmd_sample, ("eval", None): cmd_eval}
