"""Credentials never at rest: the spec refuses storage and tracker settings that look like secrets.

The resolved spec is saved everywhere a run goes (spec.yaml in the run directory and on the bucket, every
checkpoint, the job's working directory on a Ray cluster, the trackers' run config), so a credential
written in it would be copied to all of those. Providers read credentials from the environment or their
own credential files; this module finds the values that should be there instead and says where.
`trainer.spec.parse_spec` applies it (`refuse_spec_credentials`) to every spec it reads, before validation:
output.dir, output.storage_options, output.mlflow_uri, and every data and eval source's path and
storage_options.

The rule (`credential_paths`), applied to every key of a nested mapping (dicts and lists, walked to the
leaves; a list item's key is its index):

1. The key is cut into lower-case words at every character that is not a letter or a digit, at
   lower→upper case changes, before the last capital of a run of capitals followed by a lower-case letter
   (``SSECustomerKey`` → sse, customer, key) and between letters and digits.
2. The key *names a credential* when one of its words is a credential word: one of key, keys, session,
   sessions, private, pkey, pwd, sas, cookie, cookies, creds; or a word containing secret, token, passw,
   passphrase, credential, auth (but not tokenizer, author or authority), apikey, accesskey,
   accountkey, privatekey — run-together compounds such as sessiontoken, oauth, authorization count;
   or the key is ``connection_string`` (an Azure connection string holds the account key).
3. Except when its *last* word says the value is *about* a credential, not the credential itself: name,
   names, file, filename, path, dir, url, uri, endpoint, prefix, suffix, type, kind, mode, style,
   algorithm, method, version, region, provider, profile, expiry, expires, expiration, timeout, ttl,
   duration, length, size, kwargs, args, options, opts, config, params, settings; and a last word id
   after a word containing kms (``SSEKMSKeyId``, ``kms_key_id``: the id of a key the KMS holds). So
   ``key_prefix``, ``key_filename``, ``session_kwargs``, ``token_uri``, ``auth_type`` are harmless, and
   ``aws_access_key_id`` is not (it is half of an access key pair).
4. A leaf under a credential key is reported unless it carries nothing: None, true/false and the empty
   string pass, and so do gcsfs's named modes of ``token`` (anon, google_default, cloud, browser, cache).
   Numbers count (a numeric password is still one). A credential key holding a mapping or a list is
   reported as a whole (gcsfs's ``token: {type: service_account, …}``); a harmless key holding one is
   walked into (``client_kwargs.aws_secret_access_key`` is found).
5. Whatever its key, a string that is a URL with a password (``scheme://user:password@host``) is reported.

Harmless by rule 2 alone: endpoint_url, region_name, anon, use_ssl, profile, requester_pays, account_name,
client_id, tenant_id, config_kwargs.signature_version, s3_additional_kwargs.ServerSideEncryption.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from trainer.errors import SpecError

_CREDENTIAL_WORDS = frozenset(
    {"key", "keys", "session", "sessions", "private", "pkey", "pwd", "sas", "cookie", "cookies", "creds"}
)
_CREDENTIAL_STEMS = ("secret", "token", "passw", "passphrase", "credential", "auth", "apikey", "accesskey",
                     "accountkey", "privatekey")
_NOT_CREDENTIAL_WORDS = frozenset({"tokenizer", "tokenizers", "author", "authors", "authority", "authorities"})
_CREDENTIAL_KEYS = frozenset({("connection", "string")})
_DESCRIPTOR_WORDS = frozenset(
    {"name", "names", "file", "filename", "path", "dir", "url", "uri", "endpoint", "prefix", "suffix", "type",
     "kind", "mode", "style", "algorithm", "method", "version", "region", "provider", "profile", "expiry",
     "expires", "expiration", "timeout", "ttl", "duration", "length", "size", "kwargs", "args", "options", "opts",
     "config", "params", "settings"}
)
_GCSFS_TOKEN_MODES = frozenset({"anon", "google_default", "cloud", "browser", "cache"})
_WORD = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|[0-9]+")


def key_words(key: Any) -> list[str]:
    """The lower-case words of a key (rule 1): ``aws_secret_access_key`` → aws, secret, access, key."""
    return [w.lower() for w in _WORD.findall(str(key))]


def names_credential(key: Any) -> bool:
    """Whether a key names a credential (rules 2 and 3), whatever its value."""
    words = key_words(key)
    if not words:
        return False
    if words[-1] in _DESCRIPTOR_WORDS or (words[-1] == "id" and any("kms" in w for w in words[:-1])):
        return False
    if tuple(words) in _CREDENTIAL_KEYS:
        return True
    return any(w in _CREDENTIAL_WORDS or (w not in _NOT_CREDENTIAL_WORDS and any(s in w for s in _CREDENTIAL_STEMS))
               for w in words)


def _carries_nothing(key: Any, value: Any) -> bool:
    if value is None or isinstance(value, bool) or value == "":
        return True
    return str(key) == "token" and isinstance(value, str) and value in _GCSFS_TOKEN_MODES


def url_has_password(value: Any) -> bool:
    """A string URL with a password in it (rule 5): ``https://user:password@host/``."""
    if not isinstance(value, str) or "://" not in value or "@" not in value:
        return False
    try:
        return bool(urlsplit(value.strip()).password)
    except ValueError:  # not a URL after all (e.g. an unbalanced '[' in the host)
        return False


def credential_paths(node: Any, prefix: str = "") -> list[str]:
    """The dotted key paths (``client_kwargs.aws_secret_access_key``, ``headers.0.Authorization``) of the values
    in `node` that look like credentials, by the rule in this module's docstring; [] when there is none."""
    found: list[str] = []
    _walk(node, prefix, found, set())
    return found


def _walk(node: Any, path: str, found: list[str], open_containers: set[int]) -> None:
    if isinstance(node, Mapping):
        items = [(str(k), k, v) for k, v in node.items()]
    elif isinstance(node, Sequence) and not isinstance(node, str | bytes):
        items = [(str(i), i, v) for i, v in enumerate(node)]
    else:
        if url_has_password(node):
            found.append(path)
        return
    if id(node) in open_containers:  # a YAML alias that contains itself: its items are being walked already
        return
    open_containers.add(id(node))
    for name, key, value in items:
        child = f"{path}.{name}" if path else name
        if names_credential(key) and not _carries_nothing(key, value):
            if not isinstance(value, Mapping | Sequence) or isinstance(value, str | bytes) or len(value):
                found.append(child)
            continue
        _walk(value, child, found, open_containers)
    open_containers.discard(id(node))


def where_credentials_go(url: str | None) -> str:
    """Where the storage at `url` (an output.dir or a data source path) reads its credentials from."""
    protocol = url.split("://", 1)[0].lower() if isinstance(url, str) and "://" in url else ""
    if protocol in ("s3", "s3a"):
        return ("for s3://, set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary "
                "keys) in the environment of every process, or put them in ~/.aws/credentials (a profile there: "
                "AWS_PROFILE or storage_options.profile), or give the nodes an instance role")
    if protocol in ("gs", "gcs"):
        return ("for gs://, set GOOGLE_APPLICATION_CREDENTIALS to the path of a service-account key file on every "
                "node (or run `gcloud auth application-default login`), or give the nodes a service account")
    if protocol in ("az", "abfs", "abfss", "adl"):
        return ("for az://, set AZURE_STORAGE_ACCOUNT_NAME with AZURE_STORAGE_ACCOUNT_KEY, AZURE_STORAGE_SAS_TOKEN "
                "or AZURE_STORAGE_CONNECTION_STRING (or AZURE_STORAGE_CLIENT_ID, AZURE_STORAGE_CLIENT_SECRET and "
                "AZURE_STORAGE_TENANT_ID) in the environment of every process")
    return ("put credentials in the environment variables or the credential file that the storage's fsspec "
            "backend reads (its documentation names them), on every node")


def refuse_credentials(value: Any, where: str, url: str | None = None) -> Any:
    """`value` unchanged, or SpecError naming each dotted key under `where` whose value looks like a credential
    (never the value) and where the credential goes instead; `url` (the storage the options are for) picks
    the advice. Raised as SpecError, not ValueError, on purpose: pydantic would copy the value into its
    ValidationError (input_value), and from there into tracebacks."""
    paths = credential_paths(value, where) if isinstance(value, Mapping | list | tuple) else (
        [where] if url_has_password(value) else [])
    if not paths:
        return value
    if isinstance(value, str):
        advice = ("put the user name and password in the environment instead (for MLflow: MLFLOW_TRACKING_USERNAME "
                  "and MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN)" if "mlflow" in where else
                  f"write the URL without them and {where_credentials_go(url or value)}")
        raise SpecError(f"{where} holds a password in its URL (user:password@): {_SAVED}; {advice}")
    noun = "looks like a credential" if len(paths) == 1 else "look like credentials"
    raise SpecError(
        f"{', '.join(paths)} {noun}: {_SAVED}. Remove {'it' if len(paths) == 1 else 'them'}; "
        f"{where_credentials_go(url)}. Settings that are not secret (endpoint_url, region names, profile names) "
        f"may stay in {where}"
    )


_SAVED = ("the spec is saved with the run (spec.yaml in the run directory and on the bucket, checkpoints, "
          "trackers, the job sent to a Ray cluster), so it takes no credentials")


def refuse_spec_credentials(raw: Mapping) -> None:
    """SpecError for the first place of a raw spec (the mapping read from YAML plus overrides, before it is
    validated) that holds a credential, by the rule above: output.dir, output.storage_options, output.mlflow_uri
    (the trackers' settings) and every data and eval source's path and storage_options. Checked on the raw
    mapping, so that no other error message can quote the value first."""
    output = raw.get("output")
    if isinstance(output, Mapping):
        url = output.get("dir") if isinstance(output.get("dir"), str) else None
        for key in ("dir", "storage_options", "mlflow_uri"):
            if key in output:
                refuse_credentials(output[key], f"output.{key}", url)
    for section in ("data", "eval"):
        sources = raw.get(section).get("sources") if isinstance(raw.get(section), Mapping) else None
        if not isinstance(sources, list):
            continue
        for n, source in enumerate(sources):
            if not isinstance(source, Mapping):
                continue
            path = source.get("path") if isinstance(source.get("path"), str) else None
            for key in ("path", "storage_options"):
                if key in source:
                    refuse_credentials(source[key], f"{section}.sources.{n}.{key}", path)
