"""`zeroray export RUN_DIR --hf OUT_DIR`: a checkpoint → a folder `transformers` loads.

DeepSpeed's own consolidation (`get_fp32_state_dict_from_zero_checkpoint`) gathers the ZeRO
partitions into full fp32 weights; `models.hf` wraps zeroray's module as a PreTrainedModel.
Expert-parallel checkpoints go through DeepSpeed's universal-checkpoint converter instead, and
come out as the plain model's weights (every expert stacked again).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

import models
from trainer.checkpoint import Checkpoint, CheckpointStore
from trainer.errors import ZerorayError
from trainer.safe_load import UnsafeCheckpointError, load_file, weights_only_loads
from trainer.spec import RunSpec, read_spec
from trainer.storage import RunDir

# Loaded by `trust_remote_code=True`; they re-export the installed zeroray classes.
REMOTE_CODE = {
    "configuration_zeroray.py": "from models.hf import ZerorayConfig  # noqa: F401  (zeroray must be installed)\n",
    "modeling_zeroray.py": "from models.hf import (  # noqa: F401\n    ZerorayConfig, ZerorayForCausalLM, "
    "ZerorayForMaskedLM, ZerorayForSeq2SeqLM, ZerorayPreTrainedModel,\n)\n",
}


def find_checkpoint(run_dir: Path, step: int | None) -> tuple[Checkpoint, RunSpec]:
    run = RunDir(run_dir)
    output = read_spec(run.spec).output if run.spec.is_file() else None
    # A run on remote storage: its checkpoints are chosen there and downloaded into the working copy.
    store = CheckpointStore.of_run(output) if output and output.remote else CheckpointStore(run.checkpoints, 0, 1)
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
    store.local_copy(ckpt)
    spec = read_spec(ckpt.path / "spec.yaml")
    return ckpt, spec


def consolidated_state_dict(ckpt: Checkpoint, spec: RunSpec) -> dict[str, torch.Tensor]:
    """Full fp32 weights of the checkpoint under the plain model's names, whatever ZeRO stage and
    expert parallelism wrote it. Every file is read weights-only (trainer.safe_load): a checkpoint
    someone replaced with a code-running pickle is refused, not run."""
    try:
        with weights_only_loads():
            return _consolidated(ckpt, spec)
    except UnsafeCheckpointError as exc:
        raise ZerorayError(str(exc)) from None


def _consolidated(ckpt: Checkpoint, spec: RunSpec) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if spec.trainer.expert_parallel > 1:
        return _expert_parallel_state_dict(ckpt, spec)
    if spec.trainer.zero_stage > 0:
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.path.parent), tag=ckpt.tag)
    # ZeRO stage 0: the full module is in the model-states file.
    states = load_file(ckpt.path / "mp_rank_00_model_states.pt")
    return {k: v.float() for k, v in states["module"].items()}


# The expert-parallel layer's names for the plain MoELayer's stacked experts (expert_parallel.py).
_EXPERT_PARALLEL_NAMES = {"w_gate": "experts.w1", "w_up": "experts.w3", "w_down": "experts.w2"}


def _expert_parallel_state_dict(ckpt: Checkpoint, spec: RunSpec) -> dict[str, torch.Tensor]:
    """Every tensor whole, from DeepSpeed's own files rather than by parsing ZeRO shards by hand.

    zero_to_fp32 refuses these checkpoints (ZeRO-1/2: the per-expert files are "not a model state
    checkpoint"; ZeRO-3: NotImplementedError), and the ZeRO-3 layout of partitioned experts is
    DeepSpeed's private format. `deepspeed.checkpoint.ds_to_universal` knows both: it writes each
    parameter whole, in fp32, experts as [E, …]. ZeRO-0 has no optimizer shards for it to read, but
    needs none: the shared model file and the per-expert files already hold whole weights."""
    whole = _zero0_tensors(ckpt) if spec.trainer.zero_stage == 0 else _universal_tensors(ckpt)
    with torch.device("meta"):  # names and shapes only
        plain = models.build(spec.model)
    tied = getattr(plain, "tied_parameters", dict)()
    state = {}
    for name, like in plain.state_dict().items():
        if name in tied:
            continue  # stored once, under the name it shares
        prefix, _, leaf = name.rpartition(".")
        source = f"{prefix}.{_EXPERT_PARALLEL_NAMES[leaf]}" if leaf in _EXPERT_PARALLEL_NAMES else name
        if source not in whole:
            raise ZerorayError(f"checkpoint {ckpt.path} has no weights for {source} (the model's {name})")
        state[name] = whole[source].float().reshape(like.shape)  # ZeRO-3 stores non-experts flattened
    return {**state, **{name: state[shared] for name, shared in tied.items()}}  # as zero_to_fp32 does


def _universal_tensors(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    with tempfile.TemporaryDirectory(prefix="zeroray-export-") as tmp:
        out = Path(tmp) / "universal"
        proc = subprocess.run(
            [sys.executable, "-m", "trainer.safe_load", "deepspeed.checkpoint.ds_to_universal",  # weights-only
             "--input_folder", str(ckpt.path),
             "--output_folder", str(out), "--num_extract_workers", "1", "--num_merge_workers", "1"],
            capture_output=True, text=True,
        )
        if proc.returncode != 0:
            raise ZerorayError(
                f"DeepSpeed's ds_to_universal could not consolidate {ckpt.path}:\n{(proc.stdout + proc.stderr)[-3000:]}"
            )
        whole = {}
        for d in (out / "zero").iterdir():
            if (d / "fp32.pt").is_file():
                saved = load_file(d / "fp32.pt")
                whole[d.name] = saved["param"] if isinstance(saved, dict) else saved  # both forms occur
        return whole


def _zero0_tensors(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """The shared weights, plus each `<layer>.experts.wN` stacked from DeepSpeed's per-expert files
    (`layer_L_expert_E_mp_rank_00_model_states.pt`, keys `<layer>.experts.wN.<E>`)."""
    whole = dict(load_file(ckpt.path / "mp_rank_00_model_states.pt")["module"])
    experts: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)
    for f in ckpt.path.glob("layer_*_expert_*_mp_rank_00_model_states.pt"):
        for key, tensor in load_file(f).items():
            prefix, _, expert = key.rpartition(".")
            experts[prefix][int(expert)] = tensor
    for prefix, by_id in experts.items():
        whole[prefix] = torch.stack([by_id[i] for i in range(len(by_id))])
    return whole


def export_hf(run_dir: Path, out_dir: Path, step: int | None = None) -> tuple[Checkpoint, Path]:
    """A checkpoint as a folder `transformers` loads: its own class where one computes the same function
    (models.hf_native: no remote code, no zeroray needed), else zeroray's wrapper with remote code."""
    from models.hf_native import build_native, native_class_name

    ckpt, spec = find_checkpoint(run_dir, step)
    state = consolidated_state_dict(ckpt, spec)
    native = native_class_name(spec.model)
    hf_model = build_native(spec.model, state) if native else _remote_code_model(ckpt, spec, state)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(out_dir)  # safetensors
    if not native:
        for name, text in REMOTE_CODE.items():
            (out_dir / name).write_text(text)
    if spec.data.tokenizer != "bytes":
        from transformers import PreTrainedTokenizerFast

        from data_pipelines.tokenizer import EOS_TOKEN

        PreTrainedTokenizerFast(tokenizer_file=spec.data.tokenizer, eos_token=EOS_TOKEN).save_pretrained(out_dir)
    (out_dir / "zeroray_export.json").write_text(
        json.dumps({"run_dir": str(run_dir), "checkpoint": str(ckpt.path), "step": ckpt.step,
                    "class": native or type(hf_model).__name__, "remote_code": not native}, indent=2) + "\n"
    )
    return ckpt, out_dir


def _remote_code_model(ckpt: Checkpoint, spec: RunSpec, state: dict[str, torch.Tensor]):
    from models.hf import ZerorayConfig, wrapper_for

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
    return hf_model
