"""The run spec: YAML + dotted overrides → one typed, validated, frozen `RunSpec`.

Each package owns its section's schema (models, data_pipelines, trainer, cluster); this module
composes them, applies overrides, checks the combinations no single section can see, and turns
pydantic's errors into messages that name the key, the value and what is allowed.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    SerializeAsAny,
    ValidationError,
    model_validator,
)

import models
from cluster.config import ClusterConfig
from data_pipelines.config import DataConfig
from models.family import FamilyConfig
from trainer.config import DebugConfig, TrainerConfig, check_elastic_batch
from trainer.errors import SpecError
from trainer.evaluation import EvalConfig
from trainer.secrets import refuse_spec_credentials
from trainer.spec_parsing import _check_shape, _explain, _shown, apply_overrides, read_yaml

__all__ = ["RunSpec", "apply_overrides", "load_spec", "parse_spec", "read_spec", "read_yaml", "resolve"]
from trainer.storage import OutputConfig, is_url


class RunSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: SerializeAsAny[FamilyConfig]
    data: DataConfig
    trainer: TrainerConfig = TrainerConfig()
    cluster: ClusterConfig = ClusterConfig()
    eval: EvalConfig = EvalConfig()
    output: OutputConfig = OutputConfig()
    debug: DebugConfig = DebugConfig()

    @model_validator(mode="after")
    def _sections_agree(self) -> RunSpec:
        t, c = self.trainer, self.cluster
        per_step = self.global_batch_size
        if c.elastic:
            check_elastic_batch(t, c.workers, self.data.check_layout)
        elif t.global_batch_size is not None and t.global_batch_size != per_step:
            raise ValueError(
                f"trainer.global_batch_size ({t.global_batch_size}) != trainer.micro_batch_size "
                f"({t.micro_batch_size}) × trainer.grad_accum_steps ({t.grad_accum_steps}) × cluster.workers "
                f"({c.workers}) = {per_step}; change one of them or drop global_batch_size"
            )
        family = type(self.model)
        supported = family.objectives
        if self.data.objective.kind not in supported:
            raise ValueError(
                f"data.objective.kind {self.data.objective.kind!r} does not fit model {self.model.name!r}, which "
                f"trains on {' or '.join(supported)}; set data.objective.kind={supported[0]}"
            )
        if t.activation_checkpointing and not family.supports_activation_checkpointing:
            raise ValueError(
                f"trainer.activation_checkpointing: model {self.model.name!r} does not support it yet; "
                f"set trainer.activation_checkpointing=false"
            )
        if self.data.document_mask and not family.supports_segment_ids:
            raise ValueError(
                f"data.document_mask: model {self.model.name!r} cannot mask attention by document (llama and "
                f"hc_llm can); set data.document_mask=false"
            )
        if self.eval.sample_prompts and self.data.objective.kind not in ("causal", "span_corruption"):
            raise ValueError(
                f"eval.sample_prompts: model {self.model.name!r} trains on {self.data.objective.kind} and does not "
                f"generate text; drop eval.sample_prompts (eval.sources scores it)"
            )
        self._expert_parallel_fits()
        max_len = self.model.sequence_limit
        if max_len is not None and self.data.seq_len > max_len:
            raise ValueError(f"data.seq_len ({self.data.seq_len}) exceeds model.max_seq_len ({max_len})")
        return self

    def _expert_parallel_fits(self) -> None:
        """Every ZeRO stage (0–3) works with expert parallelism; the model, the workers and the
        experts must split evenly."""
        ep, workers = self.trainer.expert_parallel, self.cluster.workers
        if ep == 1:
            return
        moe = self.model.moe_config
        if moe is None:
            hint = "set model.moe (e.g. model.moe={num_experts: 8}) or " if type(self.model).supports_moe else ""
            raise ValueError(
                f"trainer.expert_parallel={ep} splits MoE layers' experts, but model {self.model.name!r} has no "
                f"MoE layers; {hint}set trainer.expert_parallel=1"
            )
        if workers % ep:
            raise ValueError(
                f"cluster.workers ({workers}) must be a multiple of trainer.expert_parallel ({ep}): each group of "
                f"{ep} ranks holds one copy of every expert"
            )
        if moe.num_experts % ep:
            raise ValueError(
                f"model.moe.num_experts ({moe.num_experts}) must be divisible by trainer.expert_parallel ({ep}): "
                f"each of the {ep} ranks of a group holds the same number of experts"
            )

    @property
    def global_batch_size(self) -> int:
        if self.cluster.elastic:
            return self.trainer.global_batch_size  # required with a range of workers
        return self.trainer.micro_batch_size * self.trainer.grad_accum_steps * self.cluster.workers

    def sized_for(self, world: int) -> RunSpec:
        """The spec as it runs on `world` workers: a range of workers becomes that count, with the gradient
        accumulation that keeps trainer.global_batch_size. A fixed count is returned as it is."""
        t, c = self.trainer, self.cluster
        if not c.elastic:
            return self
        if not c.min_workers <= world <= c.max_workers:
            raise SpecError(f"{world} workers started, outside cluster.workers [{c.min_workers}, {c.max_workers}]")
        accum = t.global_batch_size // (t.micro_batch_size * world)
        return self.model_copy(update={"trainer": t.model_copy(update={"grad_accum_steps": accum}),
                                       "cluster": c.model_copy(update={"workers": world})})

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.data.seq_len

    def flops_per_token(self, model) -> float:
        """The model's training FLOPs per token of data.seq_len; an encoder–decoder also needs the
        objective's target length."""
        if self.data.objective.kind == "span_corruption":
            target = self.data.objective.lengths(self.data.seq_len).decoder
            return model.flops_per_token(self.data.seq_len, target_len=target)
        return model.flops_per_token(self.data.seq_len)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---- parsing -------------------------------------------------------------------------------


def parse_spec(raw: Any, origin: str = "config") -> RunSpec:
    """Validate a plain dict (from YAML, or a saved spec) into a RunSpec."""
    if not isinstance(raw, dict):
        raise SpecError(f"{origin}: the top level must be a mapping with model, data, trainer, cluster, eval, output")
    _check_shape(raw, origin)
    try:
        refuse_spec_credentials(raw)  # before pydantic, whose errors quote values
    except SpecError as exc:
        raise SpecError(f"{origin}: {exc}") from None
    model_raw = raw.get("model")
    if not isinstance(model_raw, dict) or "name" not in model_raw:
        raise SpecError(f"{origin}: model.name is required; known models: {', '.join(models.names())}")
    if not isinstance(model_raw["name"], str):
        raise SpecError(f"{origin}: model.name must be the name of a model (got {_shown(model_raw['name'])}); "
                        f"known models: {', '.join(models.names())}")
    try:
        entry = models.entry(model_raw["name"])
    except KeyError:
        close = difflib.get_close_matches(str(model_raw["name"]), models.names(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SpecError(
            f"{origin}: model.name {model_raw['name']!r} is not a known model{hint}; "
            f"known models: {', '.join(models.names())} (`zeroray models` lists them)"
        ) from None
    try:
        model_cfg = entry.config_cls.model_validate(model_raw)
    except ValidationError as err:
        raise SpecError(_explain(err, origin, ("model",), entry.config_cls)) from None
    try:
        return RunSpec.model_validate({**raw, "model": model_cfg})
    except ValidationError as err:
        raise SpecError(_explain(err, origin, (), RunSpec)) from None


def read_spec(path: str | Path) -> RunSpec:
    """A spec zeroray saved (run directory, checkpoint): already resolved, only validated again."""
    return parse_spec(read_yaml(path), origin=str(path))


def load_spec(path: str | Path, overrides: list[str] = ()) -> RunSpec:
    """Config file + overrides → validated RunSpec, with local paths made absolute and the
    model's vocabulary taken from the tokenizer when the config leaves it at 0."""
    raw = apply_overrides(read_yaml(path), list(overrides))
    raw.setdefault("output", {})
    if isinstance(raw["output"], dict) and not raw["output"].get("name"):
        raw["output"]["name"] = Path(path).stem
    return resolve(parse_spec(raw, origin=str(path)))


def _expanded(path: str, key: str) -> Path:
    """`~` and `~user` expanded, with a clear error naming the key for a user this machine does not know."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        user = path[1:].split("/", 1)[0]
        raise SpecError(f"{key} {path!r}: this machine has no user {user!r} whose home '~{user}' could stand "
                        f"for; write the folder out in full") from None


def _absolute(path: str, key: str) -> str:
    if "://" in path or not (path.startswith((".", "/", "~")) or _expanded(path, key).exists()):
        return path  # URLs and Hub dataset names stay as written
    return str(_expanded(path, key).resolve())


def resolve(spec: RunSpec) -> RunSpec:
    """Make the spec self-contained: absolute local paths (Ray workers run in other folders)
    and a concrete vocabulary size."""
    from data_pipelines.tokenizer import load_tokenizer

    data = spec.data.model_copy(
        update={
            "sources": tuple(s.model_copy(update={"path": _absolute(s.path, f"data.sources.{i}.path")})
                             for i, s in enumerate(spec.data.sources)),
            "tokenizer": (spec.data.tokenizer if spec.data.tokenizer == "bytes"
                          else _absolute(spec.data.tokenizer, "data.tokenizer")),
        }
    )
    if "loader_workers" not in spec.data.model_fields_set and spec.cluster.cpus_per_worker == 1:
        # A loader process overlaps reading with training only on a core of its own; on a worker's one core
        # it time-shares with the rank and adds its start (a fork server importing torch and datasets) to
        # the first step: 2.3 s of the demo's on 2 cores (docs/performance.md).
        data = data.model_copy(update={"loader_workers": 0})
    try:
        tokenizer_vocab = load_tokenizer(data.tokenizer).vocab_size
        specials = data.special_tokens
    except (FileNotFoundError, ValueError) as exc:
        raise SpecError(str(exc)) from None
    vocab = tokenizer_vocab + specials
    model = spec.model
    declared = model.vocab_size  # every family has one (models.family.FamilyConfig)
    if declared == 0:
        model = model.model_copy(update={"vocab_size": vocab})
    elif declared < vocab:
        raise SpecError(
            f"model.vocab_size ({declared}) is smaller than the tokenizer's vocabulary ({tokenizer_vocab}, "
            f"{data.tokenizer}) + the {data.objective.kind} objective's {specials} special tokens; "
            f"set model.vocab_size to 0 to take it from the tokenizer"
        )
    output = spec.output
    if not is_url(output.dir):
        output = output.model_copy(update={"dir": str(_expanded(output.dir, "output.dir").resolve())})
    held_out = spec.eval.model_copy(
        update={"sources": tuple(s.model_copy(update={"path": _absolute(s.path, f"eval.sources.{i}.path")})
                                 for i, s in enumerate(spec.eval.sources))}
    )
    return parse_spec({**spec.to_dict(), "model": model.model_dump(mode="json"), "data": data.model_dump(mode="json"),
                       "eval": held_out.model_dump(mode="json"), "output": output.model_dump(mode="json")})
