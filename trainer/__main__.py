"""Run the trainer without Ray: `torchrun --nproc_per_node 2 -m trainer CONFIG [key=value ...]`.

The same code path as under Ray Train; the launcher (torchrun, `accelerate launch`, the
`deepspeed` launcher) only provides the processes and the rendezvous environment.
"""

from __future__ import annotations

import os
import sys

from trainer.errors import ZerorayError


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    from trainer.loop import train
    from trainer.spec import load_spec

    try:
        spec = load_spec(argv[0], argv[1:])
        if int(os.environ.get("RANK", "0")) == 0:
            from trainer.run_prep import preflight_data, prepare_run_dir

            preflight_data(spec.sized_for(int(os.environ.get("WORLD_SIZE", "1"))))
            _, status, _ = prepare_run_dir(spec, fresh=False)
            print(f"zeroray: {status}", file=sys.stderr)
    except ZerorayError as exc:
        print(f"zeroray: error: {exc}", file=sys.stderr)
        return 2
    last = train(spec)
    if last is not None and last["step"] < spec.trainer.max_steps:
        print(f"zeroray: stopped at step {last['step']} after a checkpoint (preempted); run the same command to "
              f"resume", file=sys.stderr)
    elif last is not None:
        print(f"zeroray: finished at step {last['step']}, loss {last['loss']:.4f}, "
              f"{last['tokens_per_s']:.0f} tokens/s; run directory {spec.output.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
