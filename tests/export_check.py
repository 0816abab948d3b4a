"""Shared by the training tests: export a finished run and check `transformers` reproduces it."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import torch

# Run in a fresh interpreter where zeroray's packages cannot be imported (the editable install makes
# them importable from anywhere): a native export must load with transformers alone.
WITHOUT_ZERORAY = """
import importlib.abc, sys
class NoZeroray(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("models", "trainer", "launcher", "data_pipelines", "cluster"):
            raise ModuleNotFoundError(f"{name} is zeroray's; a native export must not need it")
sys.meta_path.insert(0, NoZeroray())
"""
WITHOUT_ZERORAY_CAUSAL = WITHOUT_ZERORAY + """
import torch
from transformers import AutoModelForCausalLM
folder, ids_file, out_file = sys.argv[1:]
model = AutoModelForCausalLM.from_pretrained(folder).eval()
model.generation_config.eos_token_id = None  # 20 tokens whatever they are (exports name the end-of-text id)
ids = torch.load(ids_file)
with torch.no_grad():
    logits = model(ids).logits
    out = model.generate(ids[:, :8], max_new_tokens=20, do_sample=False, use_cache=True, output_scores=True,
                         return_dict_in_generate=True)
    uncached = model(out.sequences, use_cache=False).logits[:, 7:-1]
torch.save({"class": type(model).__name__, "logits": logits, "sequences": out.sequences,
            "cached_scores": torch.stack(out.scores, dim=1), "uncached_logits": uncached}, out_file)
"""


def check_native(out_dir: Path, reference, input_ids: torch.Tensor) -> None:
    """The exported folder, loaded by transformers without zeroray, gives zeroray's logits; greedy
    decoding with the KV cache scores every new token as a forward pass without the cache does, and as
    zeroray's own module does (logits compared, not tokens: a near-tie may flip an argmax)."""
    got = _run_without_zeroray(WITHOUT_ZERORAY_CAUSAL, out_dir, input_ids)
    sequences, cached = got["sequences"], got["cached_scores"]
    assert sequences.shape[1] == 28
    assert torch.equal(sequences[:, 8:], cached.argmax(-1)), "greedy picks the top score"
    with torch.no_grad():
        torch.testing.assert_close(got["logits"], reference(input_ids).logits.float(), rtol=1e-4, atol=1e-4)
        ours = reference(sequences).logits[:, 7:-1].float()
    torch.testing.assert_close(cached, got["uncached_logits"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cached, ours, rtol=1e-4, atol=1e-4)


# An encoder export (models.hf_native.ENCODER_CLASSES): its outputs, and its generator's under rtd.
WITHOUT_ZERORAY_ENCODER = WITHOUT_ZERORAY + """
import json, pathlib
import torch
import transformers
folder, ids_file, out_file = sys.argv[1:]
AUTO = {"ElectraForPreTraining": "AutoModelForPreTraining", "ConvBertModel": "AutoModel"}
name = json.loads(pathlib.Path(folder, "zeroray_export.json").read_text())["class"]
model = getattr(transformers, AUTO.get(name, "AutoModelForMaskedLM")).from_pretrained(folder).eval()
ids = torch.load(ids_file)
with torch.no_grad():
    out = model(ids)
    got = {"class": type(model).__name__,
           "output": out.last_hidden_state if name == "ConvBertModel" else out.logits}
    if pathlib.Path(folder, "generator").is_dir():
        generator = transformers.AutoModelForMaskedLM.from_pretrained(pathlib.Path(folder, "generator")).eval()
        got["generator_class"], got["generator_logits"] = type(generator).__name__, generator(ids).logits
torch.save(got, out_file)
"""


def _run_without_zeroray(script: str, out_dir: Path, input_ids: torch.Tensor) -> dict:
    """`script` run on the folder in a fresh interpreter that cannot import zeroray; what it saved. The
    class it loaded is the one zeroray_export.json names, and the folder has no remote code."""
    ids_file, out_file = out_dir / "check_ids.pt", out_dir / "check_out.pt"
    torch.save(input_ids, ids_file)
    done = subprocess.run([sys.executable, "-c", script, str(out_dir), str(ids_file), str(out_file)],
                          capture_output=True, text=True, cwd="/", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = torch.load(out_file)
    ids_file.unlink(), out_file.unlink()
    assert got["class"] == json.loads((out_dir / "zeroray_export.json").read_text())["class"], got["class"]
    assert not list(out_dir.rglob("*.py")), f"a native export carries no remote code: {list(out_dir.rglob('*.py'))}"
    return got


def check_native_encoder(out_dir: Path, reference, input_ids: torch.Tensor) -> None:
    """A bert/convbert export, loaded by transformers without zeroray, gives zeroray's outputs on unpadded
    input: the MLM logits, the replaced-token logits (ElectraForPreTraining), the discriminator's hidden
    states (ConvBertModel); and under rtd the generator folder gives the generator's MLM logits."""
    got = _run_without_zeroray(WITHOUT_ZERORAY_ENCODER, out_dir, input_ids)
    with torch.no_grad():
        if got["class"] == "ConvBertModel":
            ours = reference.discriminator(input_ids).last_hidden_state
        else:
            ours = reference(input_ids).logits  # no labels: rtd gives the discriminator's logits
        torch.testing.assert_close(got["output"], ours.float(), rtol=1e-4, atol=1e-4)
        rtd = reference.config.pretraining == "rtd"
        assert ("generator_logits" in got) == rtd, sorted(got)
        if rtd:
            torch.testing.assert_close(got["generator_logits"], reference.generator(input_ids).logits.float(),
                                       rtol=1e-4, atol=1e-4)


def check_export(run_dir: Path, out_dir: Path, last_loss: float, exported: bool = False) -> None:
    """`exported`: the folder was already written (e.g. by the `zeroray export` command)."""
    from transformers import AutoConfig, AutoModel

    import models
    from data_pipelines import BatchStream
    from launcher.export import consolidated_state_dict, export_hf, find_checkpoint
    from models.hf import wrapper_for

    ckpt, spec = find_checkpoint(run_dir, None)
    if not exported:
        export_hf(run_dir, out_dir)
    card = (out_dir / "README.md").read_text()  # the model card names the checkpoint and the run's losses
    assert f"step {ckpt.step} of {spec.trainer.max_steps}" in card and "| train loss | –" not in card, card
    if not json.loads((out_dir / "zeroray_export.json").read_text())["remote_code"]:
        reference = models.build(spec.model).eval()
        reference.load_state_dict(consolidated_state_dict(ckpt, spec), strict=False)
        batch = next(BatchStream(spec.data, micro_batch=spec.data.streams, rank=0, world=1))
        if spec.data.objective.kind == "causal":
            check_native(out_dir, reference, batch["input_ids"][:, :64])
        else:
            check_native_encoder(out_dir, reference, batch["input_ids"][:, :64])
        with torch.no_grad():  # ... and it is the trained model: its loss is near the last training loss
            out = reference(**batch)  # (its auxiliary terms, e.g. ELECTRA's generator loss, are apart)
            loss = out.loss.item() - sum(v.item() for v in (out.aux_losses or {}).values())
        assert abs(loss - last_loss) < max(0.75, 0.15 * last_loss), (loss, last_loss)
        check_tokenizer(out_dir, spec)
        return
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
        objective = spec.data.objective.kind
        if objective == "causal":  # transformers' convention: labels = inputs, shifted inside
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
    if objective in ("causal", "span_corruption"):  # generate() decodes as zeroray's module does, greedily
        hf.generation_config.eos_token_id = None  # 8 tokens, whatever they are
        with torch.no_grad():
            if objective == "causal":
                prompt = batch["input_ids"][:2, :8]
                got = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False)
                ids = prompt
                for _ in range(8):
                    ids = torch.cat([ids, reference(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            else:
                prompt, mask = batch["input_ids"][:2], batch["attention_mask"][:2]
                got = hf.generate(prompt, attention_mask=mask, max_new_tokens=8, do_sample=False)
                memory, memory_mask = reference.encode(prompt, mask)
                ids = batch["decoder_input_ids"][:2, :1]
                for _ in range(8):
                    ids = torch.cat([ids, reference.decode(ids, memory, memory_mask)[:, -1].argmax(-1, keepdim=True)], 1)
        assert torch.equal(got, ids), (got, ids)
    check_tokenizer(out_dir, spec)


def check_tokenizer(out_dir: Path, spec) -> None:
    """The export's tokenizer round-trips text; an MLM's has the objective's pad and mask tokens."""
    from transformers import AutoTokenizer

    if spec.data.tokenizer == "bytes":
        return
    tok = AutoTokenizer.from_pretrained(out_dir)
    assert tok.decode(tok("def main():")["input_ids"]) == "def main():"
    if spec.data.objective.kind == "mlm":  # pad = V, mask = V + 1 (data_pipelines.objectives)
        assert (tok.pad_token_id, tok.mask_token_id) == (spec.model.vocab_size - 2, spec.model.vocab_size - 1)
        assert tok("x [MASK]")["input_ids"][-1] == tok.mask_token_id


def fake_run(run_dir: Path, spec, module: torch.nn.Module, step: int = 12, records: list[dict] = ()) -> Path:
    """A finished run directory as ZeRO stage 0 leaves it (spec.trainer.zero_stage must be 0), holding
    `module`'s weights at `step`, published like trainer.checkpoint does (manifest, `latest`), with metrics
    `records`: what export, sample and eval read, without training."""
    from trainer.checkpoint import LATEST, MANIFEST, tag_for

    assert spec.trainer.zero_stage == 0 and spec.trainer.expert_parallel == 1
    ckpt = run_dir / "checkpoints" / tag_for(step)
    ckpt.mkdir(parents=True)
    torch.save({"module": module.state_dict()}, ckpt / "mp_rank_00_model_states.pt")
    (ckpt / "spec.yaml").write_text(spec.to_yaml())
    files = {f.name: f.stat().st_size for f in ckpt.iterdir()}
    (ckpt / MANIFEST).write_text(json.dumps({"step": step, "world_size": 1, "files": files}))
    (run_dir / "checkpoints" / LATEST).write_text(tag_for(step) + "\n")
    (run_dir / "spec.yaml").write_text(spec.to_yaml())
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir
