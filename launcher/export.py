"""`zeroray export RUN_DIR --hf OUT_DIR`: a checkpoint → a folder `transformers` loads.

DeepSpeed's own consolidation (`get_fp32_state_dict_from_zero_checkpoint`) gathers the ZeRO
partitions into full fp32 weights; `models.hf` wraps zeroray's module as a PreTrainedModel.
Expert-parallel checkpoints go through DeepSpeed's universal-checkpoint converter instead, and
come out as the plain model's weights (every expert stacked again).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

import models
from trainer.checkpoint import MANIFEST, Checkpoint, CheckpointStore
from trainer.errors import ZerorayError
from trainer.safe_load import UnsafeCheckpointError, load_file, weights_only_loads
from trainer.spec import RunSpec, read_spec
from trainer.storage import RunDir, check_url, is_url

# Loaded by `trust_remote_code=True`; they re-export the installed zeroray classes.
REMOTE_CODE = {
    "configuration_zeroray.py": "from models.hf import ZerorayConfig  # noqa: F401  (zeroray must be installed)\n",
    "modeling_zeroray.py": "from models.hf import (  # noqa: F401\n    ZerorayConfig, ZerorayForCausalLM, "
    "ZerorayForMaskedLM, ZerorayForSeq2SeqLM, ZerorayPreTrainedModel,\n)\n",
}


@dataclass(frozen=True)
class Located:
    """A checkpoint chosen from what the user named, with the run it belongs to."""

    ckpt: Checkpoint
    spec: RunSpec
    run: RunDir | None
    """The run directory (its local copy for a remote run), for the metrics; None when unknown."""
    location: str
    """What the user named: a run directory, a checkpoint folder or a URL."""


def _location(target: str | Path) -> str:
    """The run or checkpoint as a string; a URL that went through pathlib (`s3:/b/x`) gets its `//` back."""
    text = str(target)
    repaired = re.sub(r"^([a-z][a-z0-9+.-]*):/(?!/)", r"\1://", text)
    return repaired if repaired != text and not Path(text).exists() else text


def locate(target: str | Path, step: int | None = None) -> Located:
    """A run directory (its latest checkpoint, or the one at `step`), a checkpoint folder
    (RUN/checkpoints/step_N), or a run directory at an fsspec URL (s3://bucket/runs/NAME: its spec, metrics
    and the chosen checkpoint are fetched into the run's local working copy, output.cache_dir). Each failure is
    one ZerorayError line."""
    location = _location(target)
    if is_url(location):
        return _locate_remote(location, step)
    path = Path(location)
    if not path.exists():
        raise ZerorayError(f"{location}: no such run directory or checkpoint")
    if (path / MANIFEST).is_file() and (path / "spec.yaml").is_file():
        return _locate_checkpoint_folder(path, step)
    if not (path / "spec.yaml").is_file() and not (path / "checkpoints").is_dir():
        raise ZerorayError(f"{location} is neither a zeroray run directory nor a checkpoint (no spec.yaml, no "
                           f"checkpoints/); `zeroray runs` lists runs")
    ckpt, spec = find_checkpoint(path, step)
    return Located(ckpt, spec, RunDir(path), location)


def _locate_checkpoint_folder(path: Path, step: int | None) -> Located:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
        ckpt = Checkpoint(path, int(manifest["step"]), int(manifest["world_size"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ZerorayError(f"{path}: unreadable checkpoint manifest ({type(exc).__name__}: {exc})") from None
    short = [rel for rel, size in files.items() if not (path / rel).is_file() or (path / rel).stat().st_size != size]
    if short:
        raise ZerorayError(f"{path} is not a complete checkpoint: {len(short)} file(s) missing or cut short "
                           f"(e.g. {short[0]})")
    if step is not None and step != ckpt.step:
        raise ZerorayError(f"{path} is the checkpoint of step {ckpt.step}, not {step}; name the run directory "
                           f"to choose a step")
    spec = _checkpoint_spec(ckpt)
    run_root = path.parent.parent
    return Located(ckpt, spec, RunDir(run_root) if (run_root / "spec.yaml").is_file() else None, str(path))


def _locate_remote(url: str, step: int | None) -> Located:
    from trainer.spec import parse_spec
    from trainer.spec_parsing import read_yaml
    from trainer.storage import RemoteFolder, pull_run_files

    try:
        check_url(url)
        text = RemoteFolder(url.rstrip("/")).read_text("spec.yaml")
    except ZerorayError:
        raise
    except Exception as exc:  # botocore, gcsfs, … each raise their own types
        raise ZerorayError(f"{url}: cannot read the run's spec.yaml ({type(exc).__name__}: {exc})") from None
    if text is None:
        raise ZerorayError(f"{url} holds no zeroray run (no spec.yaml there)")
    with tempfile.TemporaryDirectory(prefix="zeroray-spec-") as tmp:
        (Path(tmp) / "spec.yaml").write_text(text)
        spec = parse_spec(read_yaml(Path(tmp) / "spec.yaml"), origin=f"{url}/spec.yaml")
    output = spec.output
    if output.remote is None or output.remote.url.rstrip("/") != url.rstrip("/"):
        # The run was copied here from elsewhere: read it where it is, with the spec's storage options.
        output = output.model_copy(update={"dir": url.rstrip("/").rsplit("/", 1)[0],
                                           "name": url.rstrip("/").rsplit("/", 1)[1]})
    store = CheckpointStore.of_run(output)
    ckpt = _choose(store, url, step)
    run = RunDir(Path(output.run_dir))
    pull_run_files(run, output.home)  # metrics.jsonl for the model card
    return Located(ckpt, _checkpoint_spec(ckpt), run, url)


def _choose(store: CheckpointStore, where, step: int | None) -> Checkpoint:
    published = store.published()
    if not published:
        raise ZerorayError(f"{where} holds no complete checkpoint (looked in {store.home.url}); a run publishes "
                           f"one every trainer.checkpoint_every steps and at its end")
    if step is None:
        ckpt = store.latest()
    else:
        matches = [c for c in published if c.step == step]
        if not matches:
            raise ZerorayError(f"{where} has no checkpoint at step {step}; it has {[c.step for c in published]}")
        ckpt = matches[0]
    return store.local_copy(ckpt)


def _checkpoint_spec(ckpt: Checkpoint) -> RunSpec:
    """The spec saved in the checkpoint; an unknown model family (or any invalid spec) is one line."""
    try:
        return read_spec(ckpt.path / "spec.yaml")
    except FileNotFoundError:
        raise ZerorayError(f"checkpoint {ckpt.path} has no spec.yaml") from None
    except ZerorayError as exc:
        raise ZerorayError(f"checkpoint {ckpt.path}: {exc}") from None


def find_checkpoint(run_dir: Path, step: int | None) -> tuple[Checkpoint, RunSpec]:
    run = RunDir(Path(run_dir))
    output = None
    if run.spec.is_file():
        try:
            output = read_spec(run.spec).output
        except ZerorayError as exc:
            raise ZerorayError(f"run {run_dir}: {exc}") from None
    # A run on remote storage: its checkpoints are chosen there and downloaded into the working copy.
    store = CheckpointStore.of_run(output) if output and output.remote else CheckpointStore(run.checkpoints, 0, 1)
    ckpt = _choose(store, run_dir, step)
    return ckpt, _checkpoint_spec(ckpt)


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


def load_module(target: str | Path, step: int | None = None) -> tuple[torch.nn.Module, Located]:
    """zeroray's own module with a checkpoint's weights (fp32, eval mode), from a run directory, a checkpoint
    folder or a run URL: what `zeroray sample` and `zeroray eval` run, with no export step."""
    found = locate(target, step)
    module = models.build(found.spec.model)
    _load_into(module, consolidated_state_dict(found.ckpt, found.spec), found.ckpt, found.spec)
    return module.float().eval(), found


def _load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], ckpt: Checkpoint | None, spec: RunSpec) -> None:
    result = module.load_state_dict(state, strict=False)
    tied = set(getattr(module, "tied_parameters", dict)())
    if result.unexpected_keys or set(result.missing_keys) - tied:
        where = f"checkpoint {ckpt.path}" if ckpt is not None else "the weights"
        raise ZerorayError(
            f"{where} does not fit model {spec.model.name}: missing {result.missing_keys}, "
            f"unexpected {result.unexpected_keys}"
        )


def export_hf(run_dir: str | Path, out_dir: Path, step: int | None = None,
              overwrite: bool = False) -> tuple[Checkpoint, Path]:
    """A checkpoint as a folder `transformers` loads: its own class where one computes the same function
    (models.hf_native: no remote code, no zeroray needed), else zeroray's wrapper with remote code.
    `run_dir`: a run directory, a checkpoint folder or a run URL (s3://…). An existing `out_dir` that is not
    empty is refused unless `overwrite` (and then only a folder an earlier export wrote)."""
    out_dir = Path(out_dir)
    _check_target(out_dir, overwrite)  # before the (slow) consolidation
    found = locate(run_dir, step)
    state = consolidated_state_dict(found.ckpt, found.spec)
    write_export(found.spec, state, out_dir, found=found, overwrite=overwrite)
    return found.ckpt, out_dir


def _check_target(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ZerorayError(f"{out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise ZerorayError(f"{out_dir} already exists and is not empty; pass --overwrite to replace it, or "
                               f"choose another folder")
        if not (out_dir / "zeroray_export.json").is_file():
            raise ZerorayError(f"{out_dir} is not an earlier zeroray export (no zeroray_export.json): not replacing "
                               f"it; choose another folder")


def special_ids(spec: RunSpec) -> dict[str, int]:
    """The end-of-text, padding and decoder-start ids of the run's tokenizer and objective
    (data_pipelines.objectives: the objective's pad is the tokenizer's vocabulary size)."""
    from data_pipelines.tokenizer import load_tokenizer

    try:
        tokenizer = load_tokenizer(spec.data.tokenizer)
    except FileNotFoundError as exc:
        raise ZerorayError(f"the run's tokenizer is not on this machine: {exc}") from None
    kind = spec.data.objective.kind
    ids = {"eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.eos_id if kind == "causal" else tokenizer.vocab_size}
    if kind == "span_corruption":
        ids["decoder_start_token_id"] = tokenizer.vocab_size  # T5: the decoder starts from pad
    return ids


MLM_PAD_TOKEN, MLM_MASK_TOKEN = "[PAD]", "[MASK]"


def write_export(spec: RunSpec, state: dict[str, torch.Tensor], out_dir: Path, found: Located | None = None,
                 overwrite: bool = False) -> dict:
    """Weights (safetensors), config, tokenizer, remote code where needed, zeroray_export.json and the model
    card README.md, written into a fresh sibling folder and moved into place at the end (an export cut short
    leaves no half folder). `found`: the checkpoint and run the weights come from (None: e.g. a model built
    from a config, step 0)."""
    from launcher.model_card import model_card
    from models.hf_native import GENERATOR_FOLDER, build_native, build_native_generator, native_class_name

    out_dir = Path(out_dir)
    _check_target(out_dir, overwrite)
    t0 = time.perf_counter()
    step = found.ckpt.step if found else 0
    native = native_class_name(spec.model)
    ids = special_ids(spec)
    hf_model = build_native(spec.model, state) if native else _remote_code_model(spec, state, step, ids)
    generator = build_native_generator(spec.model, state) if native else None
    if native:
        for model in (hf_model, generator):
            for key, value in ids.items() if model is not None else ():
                setattr(model.config, key, value)
                if getattr(model, "generation_config", None) is not None:  # encoders do not generate
                    setattr(model.generation_config, key, value)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        hf_model.save_pretrained(staging)  # safetensors
        if generator is not None:
            generator.save_pretrained(staging / GENERATOR_FOLDER)
        if not native:
            for name, text in REMOTE_CODE.items():
                (staging / name).write_text(text)
        if spec.data.tokenizer != "bytes":
            from transformers import PreTrainedTokenizerFast

            from data_pipelines.tokenizer import EOS_TOKEN

            kind = spec.data.objective.kind
            tokenizer = PreTrainedTokenizerFast(tokenizer_file=spec.data.tokenizer, eos_token=EOS_TOKEN,
                                                pad_token=EOS_TOKEN if kind == "causal" else None)
            if kind == "mlm":  # the objective's pad = V and mask = V + 1 (data_pipelines.objectives)
                vocab = len(tokenizer)
                tokenizer.add_special_tokens({"pad_token": MLM_PAD_TOKEN})
                tokenizer.add_special_tokens({"mask_token": MLM_MASK_TOKEN})
                if (tokenizer.pad_token_id, tokenizer.mask_token_id) != (vocab, vocab + 1):
                    raise ZerorayError(f"{spec.data.tokenizer}: its ids are not 0…{vocab - 1}, so the "
                                       f"objective's pad and mask ids ({vocab}, {vocab + 1}) have no token")
            tokenizer.save_pretrained(staging)
        info = {"run_dir": str(found.run.root) if found and found.run else None,
                "source": found.location if found else None,
                "checkpoint": str(found.ckpt.path) if found else None, "step": step,
                "class": native or type(hf_model).__name__, "remote_code": not native}
        (staging / "zeroray_export.json").write_text(json.dumps(info, indent=2) + "\n")
        module = hf_model.model if not native else None
        (staging / "README.md").write_text(model_card(spec, found, info, module, staging))
        if out_dir.exists():
            shutil.rmtree(out_dir)  # empty, or an earlier export (_check_target)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    info["export_s"] = time.perf_counter() - t0
    return info


def _remote_code_model(spec: RunSpec, state: dict[str, torch.Tensor], step: int, ids: dict[str, int]):
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
        zeroray_step=step,
        **ids,
    )
    hf_model = wrapper(config)
    _load_into(hf_model.model, state, None, spec)
    return hf_model
