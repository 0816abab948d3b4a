"""A real S3-compatible server for tests: moto in server mode on 127.0.0.1 (a free port), with its
credential checks switched on, so wrong keys fail as they would on AWS."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import s3fs

REGION = "eu-west-1"  # not us-east-1: creating a bucket there rejects an explicit location constraint


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    key: str
    secret: str

    def storage_options(self, **overrides: str) -> dict[str, str]:
        """Flat s3fs options, as a data source's `storage_options` takes them."""
        return {"endpoint_url": self.endpoint_url, "key": self.key, "secret": self.secret, **overrides}

    def filesystem(self) -> s3fs.S3FileSystem:
        """A filesystem of its own (no shared instance or listing cache) for writing test data."""
        return s3fs.S3FileSystem(**self.storage_options(), client_kwargs={"region_name": REGION},
                                 skip_instance_cache=True)


@contextmanager
def s3_server() -> Iterator[S3Server]:
    """Start the server, create a user allowed s3:* and switch authentication on; stop it after."""
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
    try:
        yield S3Server(endpoint, access["AccessKeyId"], access["SecretAccessKey"])
    finally:
        moto.settings.INITIAL_NO_AUTH_ACTION_COUNT = unauthenticated_requests
        server.stop()
