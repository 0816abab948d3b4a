"""Driver-side progress: follows the run's metrics file while the workers train.

A tqdm bar on a terminal; otherwise one plain, parseable line of key=value pairs at most every
`interval_s` (CI logs, nohup): `step=120/300 loss=4.1234 lr=0.003 tokens_per_s=12345 mfu=0.0412 eta_s=80`,
with `eval/loss=…` on evaluation steps; mfu and eval/loss appear only when the record has them. On
evaluation steps with eval.sample_prompts, one `step N sample: 'prompt' → 'text'` line per prompt.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path


def format_line(rec: dict) -> str:
    remaining = rec["max_steps"] - rec["step"]
    eta = remaining * rec["step_time_s"]
    pairs = [f"step={rec['step']}/{rec['max_steps']}", f"loss={rec['loss']:.4f}", f"lr={rec['lr']:.3g}",
             f"tokens_per_s={rec['tokens_per_s']:.0f}"]
    if rec.get("mfu") is not None:
        pairs.append(f"mfu={rec['mfu']:.3g}")
    if rec.get("eval/loss") is not None:
        pairs.append(f"eval/loss={rec['eval/loss']:.4f}")
    return " ".join([*pairs, f"eta_s={eta:.0f}"])


def _terminal_columns(stream) -> int:
    """Width of the terminal behind `stream`; 0 when it is not one (or a pty with no size, where a
    bar would render as nothing)."""
    try:
        return os.get_terminal_size(stream.fileno()).columns if stream.isatty() else 0
    except (OSError, ValueError, AttributeError):
        return 0


class Progress:
    def __init__(self, metrics: Path, start_step: int, max_steps: int, interval_s: float = 10.0, stream=None,
                 sinks: tuple = ()):
        """`sinks`: callables that receive every record (metric trackers such as TensorBoard)."""
        self.metrics = metrics
        self.sinks = sinks
        self.offset = metrics.stat().st_size if metrics.exists() else 0  # skip earlier launches
        self.start_step, self.max_steps = start_step, max_steps
        self.interval_s = interval_s
        self.stream = stream or sys.stderr
        self.last: dict | None = None
        self.first_record_at: float | None = None
        self._printed_at = float("-inf")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._bar = None
        self._eval_loss: float | None = None
        if _terminal_columns(self.stream) > 0:
            from tqdm import tqdm

            self._bar = tqdm(total=max_steps, initial=start_step, unit="step", file=self.stream, dynamic_ncols=True)

    def __enter__(self) -> Progress:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._poll()  # the records written just before the end
        if self._bar is not None:
            self._bar.close()

    def _records(self) -> list[dict]:
        if not self.metrics.exists():
            return []
        with open(self.metrics, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits for the next poll
        self.offset += len(complete)
        return [json.loads(line) for line in complete.decode().splitlines() if line.strip()]

    def _poll(self) -> None:
        for rec in self._records():
            if self.first_record_at is None:
                self.first_record_at = time.time()
            self.last = rec
            self._show(rec)
            for sink in self.sinks:
                sink(rec)

    def _show(self, rec: dict) -> None:
        for s in rec.get("eval/samples") or ():  # eval.sample_prompts: one line each, on every evaluation
            line = f"step {rec['step']} sample: {s['prompt']!r} → {s['text']!r}"
            if self._bar is None:
                print(line, file=self.stream, flush=True)
            else:
                self._bar.write(line, file=self.stream)
        if self._bar is not None:
            self._bar.n = rec["step"]
            shown = {"loss": f"{rec['loss']:.4f}", "tok_s": f"{rec['tokens_per_s']:.0f}"}
            if rec.get("mfu") is not None:
                shown["mfu"] = f"{rec['mfu']:.1%}"
            if rec.get("eval/loss") is not None:
                self._eval_loss = rec["eval/loss"]
            if self._eval_loss is not None:  # the latest evaluation stays on the bar until the next
                shown["eval_loss"] = f"{self._eval_loss:.4f}"
            self._bar.set_postfix(shown, refresh=False)
            self._bar.refresh()
            return
        now = time.monotonic()
        if rec["step"] >= rec["max_steps"] or now - self._printed_at >= self.interval_s:
            self._printed_at = now
            print(format_line(rec), file=self.stream, flush=True)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self._poll()
