"""tokenize with s3:// input and output against a real S3 server on 127.0.0.1 (moto's server mode):
JSONL read through datatrove's fsspec folders, shards staged locally then uploaded by
shards.storage, manifest last."""
from __future__ import annotations

import json
import os
import socket

import pytest

os.environ.setdefault("TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS", "")

moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3(monkeypatch):
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=url)
    client.create_bucket(Bucket="data")
    yield url, client
    server.stop()


def test_tokenize_s3_in_s3_out(tmp_path, s3):
    from pipelines.cli import main as cli_main
    from pipelines.fineweb import CORPUS
    from shards.manifest import Manifest

    url, client = s3
    rows = [{"id": f"d{i}", "text": f"Document number {i} says something about rivers and bridges."} for i in range(200)]
    client.put_object(Bucket="data", Key="raw/part-0.jsonl", Body="".join(json.dumps(r) + "\n" for r in rows))
    rc = cli_main(CORPUS, ["tokenize", "--input", "s3://data/raw", "--output", "s3://data/shards/fw",
                           "--endpoint-url", url, "--tokenizer", "cl100k", "--val-fraction", "0.2",
                           "--logging-dir", str(tmp_path / "logs")])
    assert rc == 0
    keys = {o["Key"] for o in client.list_objects_v2(Bucket="data", Prefix="shards/fw/")["Contents"]}
    assert "shards/fw/manifest.json" in keys and "shards/fw/train/00000.ds" in keys
    m = Manifest.from_dict(json.loads(client.get_object(Bucket="data", Key="shards/fw/manifest.json")["Body"].read()))
    assert m.splits["train"].documents + m.splits["val"].documents == 200
    assert m.source == "s3://data/raw"
    for name in m.files:
        assert f"shards/fw/{name}" in keys
    # a missing s3 input is a clean exit 2, before anything runs
    assert cli_main(CORPUS, ["tokenize", "--input", "s3://data/nothing-here", "--output", str(tmp_path / "o"),
                             "--endpoint-url", url, "--tokenizer", "cl100k"]) == 2


def test_cli_storage_flags():
    """--endpoint-url/--profile/--region become shards.storage's options (R2 gets region "auto"
    unless --region says otherwise); storage_kwargs, what the manifest step hands upload(), carries
    the same three."""
    from pipelines.cli import build_parser, storage_kwargs, storage_options
    from pipelines.fineweb import CORPUS

    r2 = "https://acct.r2.cloudflarestorage.com"
    parse = build_parser(CORPUS).parse_args
    assert storage_options(parse(["tokenize"])) == {}
    assert storage_options(parse(["tokenize", "--endpoint-url", r2, "--profile", "p"])) == {
        "client_kwargs": {"endpoint_url": r2, "region_name": "auto"}, "profile": "p"}
    args = parse(["tokenize", "--endpoint-url", "http://127.0.0.1:9", "--region", "eu-west-1"])
    assert storage_options(args) == {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9", "region_name": "eu-west-1"}}
    assert storage_kwargs(args) == {"endpoint_url": "http://127.0.0.1:9", "profile": None, "region": "eu-west-1"}
