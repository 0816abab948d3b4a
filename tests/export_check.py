"""Shared by the training tests: export a finished run and check `transformers` reproduces it."""

from __future__ import annotations

import math
from pathlib import Path

import torch


def check_export(run_dir: Path, out_dir: Path, last_loss: float, exported: bool = False) -> None:
    """`exported`: the folder was already written (e.g. by the `zeroray export` command)."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    import models
    from data_pipelines import BatchStream
    from launcher.export import consolidated_state_dict, export_hf, find_checkpoint
    from models.hf import wrapper_for

    ckpt, spec = find_checkpoint(run_dir, None)
    if not exported:
        export_hf(run_dir, out_dir)
    config = AutoConfig.from_pretrained(out_dir, trust_remote_code=True)
    wrapper, auto = wrapper_for(spec.model.name)
    hf = auto.from_pretrained(out_dir, trust_remote_code=True).eval()
    assert type(hf).__name__ == wrapper.__name__ and config.zeroray_model["name"] == spec.model.name
    assert type(AutoModel.from_pretrained(out_dir, trust_remote_code=True)).__name__ == "ZerorayPreTrainedModel"

    # The same module, built by zeroray from DeepSpeed's consolidated weights, gives the same logits.
    reference = models.build(spec.model).eval()
    reference.load_state_dict(consolidated_state_dict(ckpt, spec), strict=False)
    batch = next(BatchStream(spec.data, micro_batch=spec.data.streams, rank=0, world=1))  # one window per stream
    with torch.no_grad():
        torch.manual_seed(0)  # models that sample in their forward (ELECTRA's generator) draw alike
        ours = reference(**batch)
        torch.manual_seed(0)
        if spec.data.objective.kind == "causal":  # transformers' convention: labels = inputs, shifted inside
            hf_out = hf(batch["input_ids"], labels=batch["input_ids"])
            loss = hf_out.loss.item()
        else:  # zeroray's own batch; its loss includes the auxiliary terms the metrics list apart
            hf_out = hf(**batch)
            loss = hf_out.loss.item() - sum(v.item() for v in (ours.aux_losses or {}).values())
        torch.testing.assert_close(hf_out.logits, ours.logits)
    # ... and it is the trained model: its loss is near the last training loss, far below chance.
    assert abs(loss - last_loss) < max(0.75, 0.15 * last_loss), (loss, last_loss)  # RTD: 50 × BCE
    if ours.logits.dim() == 3:  # token predictions (RTD's per-position logits have no vocabulary)
        assert loss < math.log(spec.model.vocab_size)
    if spec.data.tokenizer != "bytes":
        tok = AutoTokenizer.from_pretrained(out_dir)
        assert tok.decode(tok("def main():")["input_ids"]) == "def main():"
