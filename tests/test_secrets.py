"""Credentials never at rest: the run spec refuses storage and tracker settings that look like secrets
(trainer.secrets, called by trainer.spec.parse_spec), by key and never by value, says where they go
instead, and refuses them before anything is written (no run directory, no working copy, no job for a
Ray cluster)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from launcher.cli import main
from trainer.errors import SpecError
from trainer.secrets import credential_paths, names_credential, refuse_credentials
from trainer.spec import load_spec, parse_spec

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"  # a value no message or file may hold
DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"

CREDENTIAL_KEYS = [
    "key", "secret", "token", "password", "passwd", "session", "credential", "credentials", "private_key",
    "aws_access_key_id", "aws_secret_access_key", "aws_session_token", "AWS_SECRET_ACCESS_KEY", "accessKey",
    "secretKey", "secretkey", "sessionToken", "account_key", "sas_token", "client_secret", "connection_string",
    "SSECustomerKey", "Authorization", "X-Api-Key", "apikey", "oauth2Token", "auth", "passphrase", "pkey",
    "Cookie", "db-password", "refresh_token",
]
HARMLESS_KEYS = [
    "endpoint_url", "region_name", "anon", "use_ssl", "key_prefix", "key_filename", "session_kwargs",
    "token_uri", "auth_type", "profile", "requester_pays", "account_name", "client_id", "tenant_id",
    "signature_version", "ServerSideEncryption", "SSECustomerAlgorithm", "SSEKMSKeyId", "kms_key_id",
    "client_kwargs", "config_kwargs", "s3_additional_kwargs", "default_block_size", "version_aware",
    "skip_instance_cache", "username", "tokenizer", "author", "credentials_file", "private_key_path",
    "auth_endpoint", "token_expiry", "headers", "",
]


@pytest.mark.parametrize("key", CREDENTIAL_KEYS)
def test_keys_that_name_credentials(key):
    assert names_credential(key)
    assert credential_paths({"client_kwargs": {key: SECRET}}) == [f"client_kwargs.{key}"]


@pytest.mark.parametrize("key", HARMLESS_KEYS)
def test_keys_that_do_not(key):
    assert not names_credential(key)
    assert credential_paths({"client_kwargs": {key: "some-value"}}) == []


def test_paths_are_dotted_and_cover_lists_containers_urls_and_values_that_carry_nothing():
    options = {
        "endpoint_url": "http://127.0.0.1:9000",
        "client_kwargs": {"region_name": "eu-west-1", "aws_secret_access_key": SECRET},
        "headers": [{"Accept": "*/*"}, {"Authorization": f"Bearer {SECRET}"}],
        "token": {"type": "service_account", "private_key": SECRET},  # gcsfs: a credential as a mapping
        "proxy": f"http://me:{SECRET}@proxy:3128",  # a harmless key, a URL with a password
        "plain_url": "http://me@proxy:3128",  # a user, no password
        "anon": False, "key": None, "secret": "", "session": True, "credentials": {},  # carry nothing
        "pin": {"password": 1234},  # numbers count
    }
    assert credential_paths(options, "output.storage_options") == [
        "output.storage_options.client_kwargs.aws_secret_access_key",
        "output.storage_options.headers.1.Authorization",
        "output.storage_options.token",
        "output.storage_options.proxy",
        "output.storage_options.pin.password",
    ]
    assert credential_paths({"token": "anon"}) == credential_paths({"token": "google_default"}) == []  # gcsfs modes
    loop: list = []
    loop.append({"secret": SECRET, "again": loop})  # YAML aliases can build a structure that holds itself
    assert credential_paths({"loop": loop}) == ["loop.0.secret"]


@pytest.mark.parametrize("url, says", [
    ("s3://bucket/runs", "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN"),
    ("s3://bucket/runs", "~/.aws/credentials"),
    ("gs://bucket/runs", "GOOGLE_APPLICATION_CREDENTIALS"),
    ("az://container/runs", "AZURE_STORAGE_ACCOUNT_KEY"),
    ("sftp://host/runs", "the environment variables or the credential file that the storage's fsspec backend"),
    (None, "the environment variables or the credential file"),
])
def test_the_refusal_says_where_the_credential_goes(url, says):
    with pytest.raises(SpecError) as err:
        refuse_credentials({"endpoint_url": "http://h", "secret": SECRET}, "output.storage_options", url)
    assert str(err.value).startswith("output.storage_options.secret looks like a credential")
    assert says in str(err.value) and SECRET not in str(err.value)
    options = {"endpoint_url": "http://h", "client_kwargs": {"region_name": "r"}}
    assert refuse_credentials(options, "output.storage_options", url) is options


def demo(**output) -> dict:
    raw = yaml.safe_load(DEMO.read_text())
    return {**raw, "output": {**raw["output"], **output}}


@pytest.mark.parametrize("output, key", [
    ({"dir": "s3://bucket/runs", "storage_options": {"endpoint_url": "http://h", "key": "AKIA1", "secret": SECRET}},
     "output.storage_options.key, output.storage_options.secret look like credentials"),
    ({"dir": "s3://bucket/runs", "storage_options": {"client_kwargs": {"aws_session_token": SECRET}}},
     "output.storage_options.client_kwargs.aws_session_token looks like a credential"),
    ({"storage_options": {"password": SECRET}}, "output.storage_options.password looks like a credential"),
    ({"mlflow_uri": f"https://me:{SECRET}@mlflow.example.com"}, "output.mlflow_uri holds a password in its URL"),
    ({"dir": f"s3://me:{SECRET}@bucket/runs"}, "output.dir holds a password in its URL"),
])
def test_the_spec_refuses_credentials_by_key_never_by_value(output, key):
    with pytest.raises(SpecError) as err:
        parse_spec(demo(**output), "demo.yaml")
    assert str(err.value).startswith(f"demo.yaml: {key}") and SECRET not in str(err.value)
    assert SECRET not in repr(err.value.__context__) and err.value.__cause__ is None


@pytest.mark.parametrize("section", ["data", "eval"])
def test_data_sources_are_held_to_the_same_rule(section):
    raw = demo()
    raw[section]["sources"] = [{"path": "local/train"},
                               {"path": "s3://corpus/train", "storage_options": {"anon": False, "token": SECRET}}]
    with pytest.raises(SpecError, match=rf"{section}.sources.1.storage_options.token looks like a credential.*"
                                        r"AWS_ACCESS_KEY_ID") as err:
        parse_spec(raw, "demo.yaml")
    assert SECRET not in str(err.value)
    raw[section]["sources"][1]["storage_options"] = {"endpoint_url": "http://127.0.0.1:9000", "anon": False}
    raw[section]["sources"][0]["path"] = f"https://me:{SECRET}@example.com/train.jsonl"
    with pytest.raises(SpecError, match=rf"{section}.sources.0.path holds a password in its URL"):
        parse_spec(raw, "demo.yaml")


def test_settings_without_credentials_are_kept_as_written():
    options = {"endpoint_url": "http://127.0.0.1:9000", "anon": False, "profile": "research",
               "client_kwargs": {"region_name": "eu-west-1"}, "config_kwargs": {"signature_version": "s3v4"},
               "s3_additional_kwargs": {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": "alias/runs"}}
    spec = parse_spec(demo(dir="s3://bucket/runs", storage_options=options, mlflow_uri="https://mlflow.example.com"))
    assert spec.output.storage_options == options


def test_a_secret_given_to_train_is_refused_before_any_file_is_written(tmp_path, monkeypatch, capsys):
    # The user's path: `zeroray train CONFIG override…` from a folder of their own, in this process.
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the default output.cache_dir is under ~
    runs, cache = tmp_path / "runs", tmp_path / "cache"
    for overrides in (
        [f"output.dir={runs}", f"output.storage_options.secret={SECRET}"],
        ["output.dir=s3://zr-nowhere/runs", f"output.cache_dir={cache}",
         f"output.storage_options.client_kwargs.aws_secret_access_key={SECRET}"],
        ["output.dir=s3://zr-nowhere/runs", f"output.storage_options.key={SECRET}"],  # default cache_dir
    ):
        assert main(["train", str(DEMO), *overrides]) == 2
        said = capsys.readouterr()
        assert "looks like a credential" in said.err and "output.storage_options." in said.err
        assert SECRET not in said.out + said.err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == [Path("work")], "nothing was written"


def test_a_secret_never_reaches_a_ray_job():
    # `zeroray submit` validates the spec before it writes the job's spec.yaml and metadata (which holds the
    # overrides as given): a credential in them is refused there.
    from launcher.jobs import prepare

    with pytest.raises(SpecError, match="output.storage_options.token looks like a credential") as err:
        prepare(DEMO, ["output.dir=/mnt/shared/runs", f"output.storage_options.token={SECRET}"])
    assert SECRET not in str(err.value)


def test_a_saved_spec_holding_a_credential_is_refused_too(tmp_path):
    # A run directory written before the refusal existed: resuming from it says which key to move.
    saved = tmp_path / "spec.yaml"
    saved.write_text(yaml.safe_dump(demo(storage_options={"secret": SECRET})))
    with pytest.raises(SpecError, match="output.storage_options.secret looks like a credential") as err:
        load_spec(saved)
    assert SECRET not in str(err.value)
