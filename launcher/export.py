"""`zeroray export RUN_DIR --hf OUT_DIR`: a checkpoint → a folder `transformers` loads.

DeepSpeed's own consolidation (`get_fp32_state_dict_from_zero_checkpoint`) gathers the ZeRO
partitions into full fp32 weights; `models.hf` wraps zeroray's module as a PreTrainedModel.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from launcher.errors import ZerorayError
from launcher.spec import RunSpec, parse_spec
from trainer.checkpoint import Checkpoint, CheckpointStore
from trainer.run_dir import RunDir

# Loaded by `trust_remote_code=True`; they re-export the installed zeroray classes.
REMOTE_CODE = {
    "configuration_zeroray.py": "from models.hf import ZerorayConfig  # noqa: F401  (zeroray must be installed)\n",
    "modeling_zeroray.py": "from models.hf import (  # noqa: F401\n    ZerorayConfig, ZerorayForCausalLM, "
    "ZerorayForMaskedLM, ZerorayForSeq2SeqLM, ZerorayPreTrainedModel,\n)\n",
}


def find_checkpoint(run_dir: Path, step: int | None) -> tuple[Checkpoint, RunSpec]:
    run = RunDir(run_dir)
    store = CheckpointStore(run.checkpoints, 0, 1)
    published = store.published()
    if not published:
        raise ZerorayError(f"{run_dir} holds no complete checkpoint (looked in {run.checkpoints})")
    if step is None:
        ckpt = store.latest()
    else:
        matches = [c for c in published if c.step == step]
        if not matches:
            raise ZerorayError(f"{run_dir} has no checkpoint at step {step}; it has {[c.step for c in published]}")
        ckpt = matches[0]
    spec = parse_spec(yaml.safe_load((ckpt.path / "spec.yaml").read_text()), origin=str(ckpt.path / "spec.yaml"))
    return ckpt, spec


def consolidated_state_dict(ckpt: Checkpoint, spec: RunSpec) -> dict[str, torch.Tensor]:
    """Full fp32 weights of the checkpoint, whatever ZeRO stage wrote it."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if spec.trainer.zero_stage > 0:
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.path.parent), tag=ckpt.tag)
    # ZeRO stage 0: the full module is in the model-states file.
    states = torch.load(ckpt.path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return {k: v.float() for k, v in states["module"].items()}


def export_hf(run_dir: Path, out_dir: Path, step: int | None = None) -> tuple[Checkpoint, Path]:
    from models.hf import ZerorayConfig, wrapper_for

    ckpt, spec = find_checkpoint(run_dir, step)
    state = consolidated_state_dict(ckpt, spec)
    wrapper, auto = wrapper_for(spec.model.name)
    config = ZerorayConfig(
        zeroray_model=spec.model.model_dump(mode="json"),
        auto_map={
            "AutoConfig": "configuration_zeroray.ZerorayConfig",
            "AutoModel": "modeling_zeroray.ZerorayPreTrainedModel",
            auto.__name__: f"modeling_zeroray.{wrapper.__name__}",
        },
        architectures=[wrapper.__name__],
        zeroray_step=ckpt.step,
    )
    hf_model = wrapper(config)
    result = hf_model.model.load_state_dict(state, strict=False)
    tied = set(getattr(hf_model.model, "tied_parameters", dict)())
    if result.unexpected_keys or set(result.missing_keys) - tied:
        raise ZerorayError(
            f"checkpoint {ckpt.path} does not fit model {spec.model.name}: missing {result.missing_keys}, "
            f"unexpected {result.unexpected_keys}"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(out_dir)
    for name, text in REMOTE_CODE.items():
        (out_dir / name).write_text(text)
    if spec.data.tokenizer != "bytes":
        from transformers import PreTrainedTokenizerFast

        from data_pipelines.tokenizer import EOS_TOKEN

        PreTrainedTokenizerFast(tokenizer_file=spec.data.tokenizer, eos_token=EOS_TOKEN).save_pretrained(out_dir)
    (out_dir / "zeroray_export.json").write_text(
        json.dumps({"run_dir": str(run_dir), "checkpoint": str(ckpt.path), "step": ckpt.step}, indent=2) + "\n"
    )
    return ckpt, out_dir
