"""A real S3-compatible server for tests: moto in server mode on 127.0.0.1 (a free port), with its
credential checks switched on, so wrong keys fail as they would on AWS.

The credentials reach zeroray as they must reach it on a real cluster: through the environment
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), never through `storage_options`, which the run spec refuses
credentials in (trainer.secrets). `s3_server()` exports them for as long as the server runs. Ray workers
inherit the environment of the process that started the Ray cluster, as it was then: a cluster started
before the server does not see them (tests/test_remote_runs.py starts its own).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

import s3fs

REGION = "eu-west-1"  # not us-east-1: creating a bucket there rejects an explicit location constraint


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    key: str
    secret: str

    def storage_options(self, **overrides: str) -> dict[str, str]:
        """Flat s3fs options, as a data source's or output.dir's `storage_options` takes them: the endpoint;
        the keys come from the environment."""
        return {"endpoint_url": self.endpoint_url, **overrides}

    def filesystem(self) -> s3fs.S3FileSystem:
        """A filesystem of its own (no shared instance or listing cache) for writing test data; the test's own
        client, not a spec, so it takes the keys as arguments."""
        return s3fs.S3FileSystem(**self.storage_options(), key=self.key, secret=self.secret,
                                 client_kwargs={"region_name": REGION}, skip_instance_cache=True)

    def credentials(self, secret: str | None = None) -> AbstractContextManager[None]:
        """The server's keys in the environment for a block (`secret`: a wrong one instead)."""
        return aws_environment(self.key, self.secret if secret is None else secret)


_AWS_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                  "AWS_PROFILE")


@contextmanager
def aws_environment(key: str, secret: str) -> Iterator[None]:
    """AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY set (and no session token or profile) for the block, as they
    were after it. fsspec keeps one s3fs filesystem per set of options, with the credentials it found when it was
    made: those are dropped on the way in and out, so the block's requests sign with the block's keys."""
    saved = {name: os.environ.get(name) for name in _AWS_VARIABLES}
    for name in _AWS_VARIABLES:
        os.environ.pop(name, None)
    os.environ.update({"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret})
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        s3fs.S3FileSystem.clear_instance_cache()


@contextmanager
def s3_server() -> Iterator[S3Server]:
    """Start the server, create a user allowed s3:* and switch authentication on, with the user's keys in the
    environment; stop it after."""
    import botocore.session
    import moto.settings
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    # Until authentication is on, any key works: use one to make the real user.
    iam = botocore.session.get_session().create_client(
        "iam", endpoint_url=endpoint, region_name=REGION, aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    # moto's accounts live in the process, not in the server: a second server in the same test session
    # sees the first one's user, so each gets a name of its own.
    user = f"zeroray-test-{port}"
    iam.create_user(UserName=user)
    iam.put_user_policy(UserName=user, PolicyName="s3", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    ))
    access = iam.create_access_key(UserName=user)["AccessKey"]
    unauthenticated_requests = moto.settings.INITIAL_NO_AUTH_ACTION_COUNT
    moto.settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
    server_keys = S3Server(endpoint, access["AccessKeyId"], access["SecretAccessKey"])
    try:
        with server_keys.credentials():
            yield server_keys
    finally:
        moto.settings.INITIAL_NO_AUTH_ACTION_COUNT = unauthenticated_requests
        server.stop()
