"""From a checkpoint to text: remote-code exports that `generate()` (models/hf.py), the model card,
`zeroray sample` and `zeroray eval` (launcher/cmd_model.py), bits per byte (trainer/evaluation.py) and the
errors of `zeroray export` (launcher/export.py).

No training here: models are built from the shipped tiny configs with their random initialisation, and a
"run" is a checkpoint folder written the way ZeRO stage 0 writes one (tests/export_check.fake_run)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

import models
from launcher.cli import main
from launcher.export import export_hf, load_module, locate, write_export
from models.sampling import filtered_logits, generate, generate_seq2seq
from tests.conftest import REPO, write_config
from tests.export_check import fake_run
from trainer.evaluation import Evaluator, corpus_metrics, target_bytes, token_byte_lengths
from trainer.spec import load_spec

# Every shipped tiny config of a family exported with remote code; WideNet's is an MLM encoder, so its
# decoder (widenet_decoder, the same network with causal attention) is what generates: with its default
# MoE, which drops tokens by capacity (no KV cache), and dropless (cached).
WIDENET_DECODER = ["model.name=widenet_decoder", "data.objective={kind: causal}"]
REMOTE_CODE = {
    "hc_llm": ("hc_llm_tiny.yaml", []),
    "hc_llm_moe": ("hc_llm_moe_tiny.yaml", []),
    "hc_llm_mhc": ("hc_llm_mhc_tiny.yaml", []),
    "widenet_decoder": ("widenet_tiny.yaml", WIDENET_DECODER),
    "widenet_decoder_dropless": ("widenet_tiny.yaml", [*WIDENET_DECODER, "model.moe={capacity_factor: 0}"]),
    "charformer": ("charformer_tiny.yaml", []),
}


def tiny_spec(config: str, corpus: Path, tmp: Path, *overrides: str):
    """A shipped config with its data pointed at the test corpus (and ZeRO-0: fake_run's layout)."""
    raw = yaml.safe_load((REPO / "configs" / config).read_text())
    data = [f"data.sources=[{{path: {corpus / 'train'}}}]", f"eval.sources=[{{path: {corpus / 'val'}}}]",
            f"output.dir={tmp / 'runs'}", "trainer.zero_stage=0", "cluster.workers=1"]
    if raw["data"]["tokenizer"] != "bytes":
        data.append(f"data.tokenizer={corpus / 'tokenizer.json'}")
    return load_spec(REPO / "configs" / config, [*data, *overrides])


def built(spec, seed: int = 0):
    torch.manual_seed(seed)
    return models.build(spec.model).eval()


def greedy_loop(module, ids: torch.Tensor, n: int) -> torch.Tensor:
    """The plain greedy loop over zeroray's module: argmax of the last position, n times."""
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, module(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def until_eos(generated: torch.Tensor, reference: torch.Tensor, eos: int, pad: int) -> torch.Tensor:
    """The reference with what follows each row's first generated eos set to pad, as generate() leaves it."""
    ref = reference[:, : generated.shape[1]].clone()
    for row in ref:
        hits = (row == eos).nonzero()
        if len(hits):
            row[hits[0, 0] + 1:] = pad
    return ref


@pytest.mark.parametrize("family", sorted(REMOTE_CODE))
def test_remote_code_export_generates(family, small_corpus, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    config, overrides = REMOTE_CODE[family]
    if not (REPO / "configs" / config).is_file():
        pytest.skip(f"configs/{config} is not in this checkout")
    spec = tiny_spec(config, small_corpus, tmp_path, *overrides)
    ours = built(spec)
    out = tmp_path / "hf"
    write_export(spec, ours.state_dict(), out)
    card = (out / "README.md").read_text()
    cached = spec.model.kv_cache_layers > 0
    assert cached == (family != "widenet_decoder")
    assert f"{ours.num_parameters():,}" in card and "```yaml" in card
    assert ("with a key/value cache" if cached else "without a KV cache") in card
    seq2seq = spec.data.objective.kind == "span_corruption"
    auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    hf = auto.from_pretrained(out, trust_remote_code=True).eval()
    gen = hf.generation_config
    torch.manual_seed(1)
    prompt = torch.randint(0, 200, (2, 12 if seq2seq else 8))
    with torch.no_grad():
        if seq2seq:  # bytes in, bytes out: the encoder once, the decoder from pad
            start = torch.full((2, 1), gen.decoder_start_token_id)
            assert gen.decoder_start_token_id == gen.pad_token_id == 257 and gen.eos_token_id == 256
            dec = torch.cat([start, torch.randint(0, 256, (2, 5))], dim=1)
            mask = torch.ones_like(prompt)
            torch.testing.assert_close(hf(input_ids=prompt, attention_mask=mask, decoder_input_ids=dec).logits,
                                       ours(prompt, mask, dec).logits, rtol=0, atol=0)
            greedy = hf.generate(prompt, attention_mask=mask, max_new_tokens=20, do_sample=False)
            uncached = hf.generate(prompt, attention_mask=mask, max_new_tokens=20, do_sample=False, use_cache=False)
            memory, memory_mask = ours.encode(prompt, mask)
            ref = start
            for _ in range(20):
                ref = torch.cat([ref, ours.decode(ref, memory, memory_mask)[:, -1].argmax(-1, keepdim=True)], 1)
        else:
            torch.testing.assert_close(hf(prompt).logits, ours(prompt).logits, rtol=0, atol=0)
            greedy = hf.generate(prompt, max_new_tokens=20, do_sample=False)
            uncached = hf.generate(prompt, max_new_tokens=20, do_sample=False, use_cache=False)
            ref = greedy_loop(ours, prompt, 20)
    assert gen.use_cache == cached
    assert greedy.shape[1] > (1 if seq2seq else 8)
    assert torch.equal(greedy, until_eos(greedy, ref, gen.eos_token_id, gen.pad_token_id))
    assert torch.equal(greedy, uncached), "with and without the key/value cache"
    if cached and not seq2seq:  # the wrapper's forward fills the cache it is given or makes
        with torch.no_grad():
            assert hf(prompt, use_cache=True).past_key_values.get_seq_length() == prompt.shape[1]

    # Sampling: a seed gives the same draws, and the same as models.sampling (zeroray sample) draws.
    def sampled(seed):
        torch.manual_seed(seed)
        return hf.generate(prompt, max_new_tokens=8, do_sample=True, temperature=0.9, top_p=0.8, top_k=0,
                           **({"attention_mask": torch.ones_like(prompt)} if seq2seq else {}))
    a, b = sampled(3), sampled(3)
    assert torch.equal(a, b)
    if seq2seq:
        ours_sampled = generate_seq2seq(ours, prompt, None, gen.decoder_start_token_id, 8, 0.9, 0.8, seed=3,
                                        eos_id=gen.eos_token_id, pad_id=gen.pad_token_id)
    else:
        grad_modes = []  # zeroray's decoding keeps no autograd graph: every forward runs without grad
        hook = ours.register_forward_pre_hook(lambda *_: grad_modes.append(torch.is_grad_enabled()))
        ours_sampled = generate(ours, prompt, 8, 0.9, 0.8, seed=3, eos_id=gen.eos_token_id, pad_id=gen.pad_token_id)
        hook.remove()
        assert grad_modes and not any(grad_modes)
    assert torch.equal(a, ours_sampled[:, : a.shape[1]])
    beams = hf.generate(prompt, max_new_tokens=4, num_beams=3, num_return_sequences=2, do_sample=False,
                        **({"attention_mask": torch.ones_like(prompt)} if seq2seq else {}))
    assert beams.shape[0] == 4

    # save_pretrained / from_pretrained round trip of the loaded wrapper
    hf.save_pretrained(tmp_path / "again")
    for name in ("configuration_zeroray.py", "modeling_zeroray.py"):
        (tmp_path / "again" / name).write_text((out / name).read_text())
    again = auto.from_pretrained(tmp_path / "again", trust_remote_code=True).eval()
    with torch.no_grad():
        inputs = {"input_ids": prompt, **({"decoder_input_ids": greedy} if seq2seq else {})}
        assert torch.equal(again(**inputs).logits, hf(**inputs).logits)


def test_left_padded_prompts_score_as_alone(small_corpus, tmp_path):
    """A batch of prompts of different lengths (left padding, attention_mask) gives each row the logits it
    has alone: padding and text become two documents for the masking."""
    from models.hf import ZerorayConfig, ZerorayForCausalLM

    spec = tiny_spec("hc_llm_tiny.yaml", small_corpus, tmp_path)
    hf = ZerorayForCausalLM(ZerorayConfig(zeroray_model=spec.model.model_dump(mode="json"))).eval()
    short, long = torch.randint(0, 200, (1, 5)), torch.randint(0, 200, (1, 9))
    batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long])
    mask = torch.cat([torch.cat([torch.zeros(1, 4), torch.ones(1, 5)], 1), torch.ones(1, 9)]).long()
    with torch.no_grad():
        both = hf(batch, attention_mask=mask).logits
        torch.testing.assert_close(both[0, 4:], hf(short).logits[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(both[1], hf(long).logits[0], rtol=1e-4, atol=1e-5)


def test_widenet_encoder_exports_as_masked_lm(small_corpus, tmp_path):
    from transformers import AutoModelForMaskedLM

    spec = tiny_spec("widenet_tiny.yaml", small_corpus, tmp_path)
    ours = built(spec)
    write_export(spec, ours.state_dict(), tmp_path / "hf")
    hf = AutoModelForMaskedLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    ids = torch.randint(0, 200, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, ours(ids).logits, rtol=0, atol=0)
    assert not hf.can_generate() and "no `generate()`" in (tmp_path / "hf" / "README.md").read_text()


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = filtered_logits(logits, 1.0, 0.75).isfinite()[0].tolist()
    assert kept == [True, True, False, False]  # 0.5 + 0.3 reach 0.75
    assert filtered_logits(logits, 1.0, 0.1).isfinite().sum() == 1  # the top token always stays
    torch.testing.assert_close(filtered_logits(logits, 2.0, 1.0), logits / 2)
    with pytest.raises(ValueError, match="top_p"):
        filtered_logits(logits, 1.0, 0.0)


# ---- a checkpoint, and the commands on it ---------------------------------------------------------


@pytest.fixture
def llama_run(tmp_path, small_corpus):
    """A fake finished run of the conftest llama (BPE tokenizer), with metrics records."""
    spec = load_spec(write_config(tmp_path / "tiny.yaml", small_corpus, tmp_path / "runs",
                                  trainer={"zero_stage": 0}, cluster={"workers": 1}),
                     [f"eval.sources=[{{path: {small_corpus / 'val'}}}]", "eval.every=6"])
    module = built(spec)
    records = [{"step": 6, "loss": 5.5, "tokens": 6 * spec.tokens_per_step},
               {"step": 12, "loss": 4.25, "tokens": 12 * spec.tokens_per_step, "eval/loss": 4.5,
                "eval/perplexity": math.exp(4.5), "eval/bits_per_byte": 1.75}]
    return fake_run(tmp_path / "runs" / "tiny", spec, module, step=12, records=records), spec, module


def test_cli_sample_is_the_checkpoint_and_reproducible(llama_run, capsys):
    run, spec, module = llama_run
    from data_pipelines.tokenizer import load_tokenizer

    def sample(*extra):
        assert main(["sample", str(run), "--prompt", "def main", "--max-new-tokens", "12", "--json", *extra]) == 0
        return json.loads(capsys.readouterr().out)

    first, again = sample("--seed", "5", "--num-samples", "2"), sample("--seed", "5", "--num-samples", "2")
    assert first["samples"] == again["samples"] and first["step"] == 12
    assert first["samples"][0] != first["samples"][1]  # seeds 5 and 6
    greedy = sample("--temperature", "0")["samples"][0]["ids"]
    tok = load_tokenizer(spec.data.tokenizer)
    prompt = torch.tensor([[tok.eos_id, *tok.encode_batch(["def main"])[0]]])
    ref = greedy_loop(module, prompt, 12)[0, prompt.shape[1]:].tolist()
    assert greedy == (ref[: ref.index(tok.eos_id)] if tok.eos_id in ref else ref)
    # the checkpoint folder itself, and plain text output
    assert main(["sample", str(run / "checkpoints" / "step_00000012"), "--prompt", "import", "--max-new-tokens",
                 "4"]) == 0
    assert capsys.readouterr().out.startswith("import")


def test_cli_eval_and_bits_per_byte(llama_run, small_corpus, capsys):
    run, spec, module = llama_run
    assert main(["eval", str(run), "--data", str(small_corpus / "val"), "--json", "--max-windows", "6",
                 "--batch-size", "4"]) == 0
    got = json.loads(capsys.readouterr().out)
    # by hand: the same first 6 windows of the val split, scored one by one
    from data_pipelines import BatchStream, DataConfig

    cfg = DataConfig.model_validate({**spec.data.model_dump(), "sources": [{"path": str(small_corpus / "val")}],
                                     "streams": 1, "shuffle_buffer": 0, "loader_workers": 0})
    stream, lengths = BatchStream(cfg, micro_batch=1), token_byte_lengths(spec.data.tokenizer, spec.model.vocab_size)
    nll = n_bytes = tokens = 0
    with torch.no_grad():
        for _ in range(6):
            b = next(stream)
            nll += torch.nn.functional.cross_entropy(module(b["input_ids"]).logits[0].double(), b["labels"][0],
                                                     reduction="sum").item()
            n_bytes += sum(lengths[t].item() for t in b["labels"][0])
            tokens += b["labels"].numel()
    assert got["tokens"] == tokens and got["bytes"] == n_bytes and got["windows"] == 6
    assert got["loss"] == pytest.approx(nll / tokens, rel=1e-6)
    assert got["bits_per_byte"] == pytest.approx(nll / (math.log(2) * n_bytes), rel=1e-6)
    assert got["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-6)
    assert main(["eval", str(run), "--data", str(small_corpus / "val")]) == 0
    assert "bits per byte" in capsys.readouterr().out


def test_bpe_byte_lengths_sum_to_the_text_bytes(small_corpus):
    from data_pipelines.tokenizer import load_tokenizer

    path = str(small_corpus / "tokenizer.json")
    tok, lengths = load_tokenizer(path), token_byte_lengths(path, 600)
    text = "def añadir(x):  # ünïcödé → 🚀\n\treturn x + 1\n"
    ids = torch.tensor(tok.encode_batch([text])[0])
    assert int(target_bytes(ids, lengths)) == len(text.encode("utf-8"))
    assert lengths[tok.eos_id] == 0 and int(lengths[tok.vocab_size:].sum()) == 0


def test_bits_per_byte_of_a_byte_model_is_loss_over_ln2(tmp_path):
    """One document of N bytes, windows of L + 1 bytes advancing by L: the windows inside the first pass
    hold only bytes, so bits per byte = loss / ln 2; and the count of windows is the hand count."""
    text = "".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(9))
    n = len(text.encode())
    (tmp_path / "corpus.txt").write_text(text)
    spec = load_spec(write_config(tmp_path / "b.yaml", tmp_path, tmp_path / "runs", data={
        "sources": [{"path": str(tmp_path / "corpus.txt")}], "tokenizer": "bytes", "seq_len": 32, "streams": 1}))
    module = built(spec)
    got = corpus_metrics(module, spec, str(tmp_path / "corpus.txt"), batch_size=3)
    seq = 32
    windows = [k for k in range(n) if k * seq + seq + 1 <= n]  # wholly inside the document
    assert got["windows"] == len(windows) and got["bytes"] == got["tokens"] == len(windows) * seq
    raw = torch.tensor(list(text.encode()))
    ids = torch.stack([raw[k * seq: k * seq + seq + 1] for k in windows])
    with torch.no_grad():
        nll = torch.nn.functional.cross_entropy(module(ids[:, :-1]).logits.flatten(0, 1).double(),
                                                ids[:, 1:].flatten(), reduction="sum").item()
    assert got["loss"] == pytest.approx(nll / got["tokens"], rel=1e-6)
    assert got["bits_per_byte"] == pytest.approx(got["loss"] / math.log(2), rel=1e-9)


def test_training_evaluator_reports_bits_per_byte(tiny_config, small_corpus):
    spec = load_spec(tiny_config, [f"eval.sources=[{{path: {small_corpus / 'val'}}}]", "eval.batches=2",
                                   "cluster.workers=1"])
    ev = Evaluator(spec, 0, 1, torch.device("cpu"))
    lengths = token_byte_lengths(spec.data.tokenizer, spec.model.vocab_size)
    assert ev.bytes == sum(int(target_bytes(b["labels"], lengths)) for b in ev.batches) > 0

    class Engine(torch.nn.Module):  # the evaluator calls the DeepSpeed engine; the bare module here
        def __init__(self):
            super().__init__()
            self.module = built(spec)

        def forward(self, **batch):
            return self.module(**batch)

    sums = {k: float(v) for k, v in ev.sums(Engine()).items()}
    metrics = Evaluator.metrics(sums)
    assert metrics["eval/bits_per_byte"] == pytest.approx(sums["eval/loss_sum"] / (math.log(2) * ev.bytes))


# ---- export: the model card and the errors --------------------------------------------------------


def test_export_card_and_errors(llama_run, small_corpus, tmp_path, capsys):
    run, spec, module = llama_run
    out = tmp_path / "hf"
    assert main(["export", str(run), "--hf", str(out)]) == 0
    capsys.readouterr()
    card = (out / "README.md").read_text()
    assert "LlamaForCausalLM" in card and f"{12 * spec.tokens_per_step:,}" in card
    assert "| train loss | 4.2500 (step 12) |" in card and "bits per byte 1.7500" in card
    assert "transformers' own class" in card and spec.to_yaml().splitlines()[0] in card
    from transformers import AutoModelForCausalLM

    from data_pipelines.tokenizer import load_tokenizer

    native = AutoModelForCausalLM.from_pretrained(out)
    eos = load_tokenizer(spec.data.tokenizer).eos_id
    assert native.generation_config.eos_token_id == native.generation_config.pad_token_id == eos
    capsys.readouterr()  # transformers' loading progress

    def error(*argv) -> str:
        assert main(list(argv)) == 2
        message = capsys.readouterr().err.strip()
        assert message.startswith("zeroray: error: ") and "\n" not in message, message
        return message

    assert "already exists and is not empty; pass --overwrite" in error("export", str(run), "--hf", str(out))
    export_hf(run, out, overwrite=True)  # an earlier export is replaced
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(Exception, match="not an earlier zeroray export"):
        export_hf(run, tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    capsys.readouterr()

    empty = tmp_path / "runs" / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    (empty / "spec.yaml").write_text(spec.to_yaml())
    assert "holds no complete checkpoint" in error("export", str(empty), "--hf", str(tmp_path / "x"))
    assert "no such run directory" in error("export", str(tmp_path / "nowhere"), "--hf", str(tmp_path / "x"))
    assert "no checkpoint at step 7" in error("export", str(run), "--hf", str(tmp_path / "x"), "--step", "7")

    alien = yaml.safe_load(spec.to_yaml())
    alien["model"]["name"] = "gpt9"
    ckpt = run / "checkpoints" / "step_00000012"
    (ckpt / "spec.yaml").write_text(yaml.safe_dump(alien))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"]["spec.yaml"] = (ckpt / "spec.yaml").stat().st_size
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    assert "model.name 'gpt9' is not a known model" in error("export", str(ckpt), "--hf", str(tmp_path / "y"))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    assert "gpt9" in error("sample", str(ckpt), "--prompt", "x")


def test_sample_refuses_a_masked_language_model(small_corpus, tmp_path, capsys):
    spec = tiny_spec("widenet_tiny.yaml", small_corpus, tmp_path)
    run = fake_run(tmp_path / "runs" / "w", spec, built(spec), step=3)
    assert main(["sample", str(run), "--prompt", "x"]) == 2
    assert "trains on mlm" in capsys.readouterr().err


def test_charformer_sample_and_eval_from_a_checkpoint(small_corpus, tmp_path, capsys):
    spec = tiny_spec("charformer_tiny.yaml", small_corpus, tmp_path)
    run = fake_run(tmp_path / "runs" / "c", spec, built(spec), step=3)
    module, found = load_module(run)
    assert found.ckpt.step == 3 and locate(run).spec.model.name == "charformer"
    assert main(["sample", str(run), "--prompt", "def f(x):", "--max-new-tokens", "8", "--json",
                 "--temperature", "0"]) == 0
    got = json.loads(capsys.readouterr().out)["samples"][0]
    assert all(i < 256 for i in got["ids"]) and len(got["ids"]) <= 8  # bytes out, specials stripped
    assert main(["eval", str(run), "--data", str(small_corpus / "val"), "--json", "--max-windows", "2"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["objective"] == "span_corruption" and 0 < got["bytes"] < got["tokens"]  # sentinels carry no bytes


def test_export_sample_and_eval_from_a_run_on_s3(llama_run, small_corpus, tmp_path, monkeypatch, capsys):
    """A run directory at an s3:// URL: its spec is read there (the endpoint, for a server other than AWS,
    from AWS_ENDPOINT_URL like every AWS tool), the chosen checkpoint fetched into output.cache_dir."""
    from tests.s3_server import s3_server

    local, spec, _ = llama_run
    with s3_server() as server:
        fs = server.filesystem()
        fs.mkdir("zr-export")
        remote_spec = load_spec(write_config(tmp_path / "remote.yaml", small_corpus, tmp_path / "unused",
                                             trainer={"zero_stage": 0}, cluster={"workers": 1}),
                                ["output.dir=s3://zr-export/runs", "output.name=tiny",
                                 f"output.storage_options={{endpoint_url: {server.endpoint_url}}}",
                                 f"output.cache_dir={tmp_path / 'cache'}"])
        for f in (local / "spec.yaml", local / "checkpoints" / "step_00000012" / "spec.yaml"):
            f.write_text(remote_spec.to_yaml())
        manifest = local / "checkpoints" / "step_00000012" / "manifest.json"
        files = json.loads(manifest.read_text())
        files["files"]["spec.yaml"] = (local / "checkpoints" / "step_00000012" / "spec.yaml").stat().st_size
        manifest.write_text(json.dumps(files))
        fs.put(f"{local}/", "zr-export/runs/tiny/", recursive=True)
        monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint_url)
        url = "s3://zr-export/runs/tiny"
        assert main(["export", url, "--hf", str(tmp_path / "hf")]) == 0
        assert "LlamaForCausalLM" in (tmp_path / "hf" / "README.md").read_text()
        assert (tmp_path / "cache" / "s3" / "zr-export" / "runs" / "tiny" / "checkpoints" / "step_00000012").is_dir()
        assert main(["sample", url, "--prompt", "x", "--max-new-tokens", "3"]) == 0
        capsys.readouterr()
        assert main(["eval", url, "--data", str(small_corpus / "val"), "--max-windows", "2", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["windows"] == 2
        assert main(["export", "s3://zr-export/runs/missing", "--hf", str(tmp_path / "x")]) == 2
        assert "no zeroray run (no spec.yaml there)" in capsys.readouterr().err
