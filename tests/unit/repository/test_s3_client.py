"""S3Storage's boto3 client: one boto3 session per process and AWS environment, a new client
in a forked child (live-restore's session process inherits the repository its CLI opened).
No server is needed: making a client sends nothing."""

from __future__ import annotations

import os

import pytest

from dmrecover.repository import s3


@pytest.fixture()
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ak")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sk")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")


def test_clients_share_one_session_until_the_environment_changes(
        aws_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    a = s3.S3Storage("s3://bucket/a")
    session = s3._boto_session()
    b = s3.S3Storage("s3://bucket/b")
    assert s3._boto_session() is session and a.client is not b.client
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "other")  # new credentials: a new session
    assert s3._boto_session() is not session
    c = s3.S3Storage("s3://bucket/c")
    assert c.client._request_signer._credentials.secret_key == "other"


def test_a_forked_child_gets_its_own_client(aws_env: None) -> None:
    st = s3.S3Storage("s3://bucket/p")
    parent_client = st.client
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its own client, made once, the same bucket and endpoint
        try:
            mine = st.client
            ok = (mine is not parent_client and st.client is mine
                  and mine.meta.endpoint_url == "http://127.0.0.1:9")
            os.write(w, b"ok" if ok else b"no")
        finally:
            os._exit(0)
    os.close(w)
    try:
        assert os.read(r, 2) == b"ok"
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    assert st.client is parent_client  # the parent keeps its own


def test_a_client_handed_in_is_kept_after_a_fork(aws_env: None) -> None:
    given = object()
    st = s3.S3Storage("s3://bucket/p", client=given)
    pid = os.fork()
    if pid == 0:
        os._exit(0 if st.client is given else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
