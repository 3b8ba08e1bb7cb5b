"""tokenize with s3:// input and output against a real S3 server on 127.0.0.1 (moto's server mode):
JSONL read through datatrove's fsspec folders, shards staged locally then uploaded by
shards.storage, manifest last."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("moto")
pytest.importorskip("boto3")


def test_tokenize_s3_in_s3_out(tmp_path, s3, server):
    from pipelines.cli import main as cli_main
    from pipelines.fineweb import CORPUS
    from shards.manifest import Manifest

    (client, bucket), url = s3, server.endpoint
    rows = [{"id": f"d{i}", "text": f"Document number {i} says something about rivers and bridges."} for i in range(200)]
    client.put_object(Bucket=bucket, Key="raw/part-0.jsonl", Body="".join(json.dumps(r) + "\n" for r in rows))
    rc = cli_main(CORPUS, ["tokenize", "--input", f"s3://{bucket}/raw", "--output", f"s3://{bucket}/shards/fw",
                           "--endpoint-url", url, "--tokenizer", "cl100k", "--val-fraction", "0.2",
                           "--logging-dir", str(tmp_path / "logs")])
    assert rc == 0
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="shards/fw/")["Contents"]}
    assert "shards/fw/manifest.json" in keys and "shards/fw/train/00000.ds" in keys
    m = Manifest.from_dict(json.loads(client.get_object(Bucket=bucket, Key="shards/fw/manifest.json")["Body"].read()))
    assert m.splits["train"].documents + m.splits["val"].documents == 200
    assert m.source == f"s3://{bucket}/raw"
    for name in m.files:
        assert f"shards/fw/{name}" in keys
    # a missing s3 input is a clean exit 2, before anything runs
    assert cli_main(CORPUS, ["tokenize", "--input", f"s3://{bucket}/nothing-here", "--output", str(tmp_path / "o"),
                             "--endpoint-url", url, "--tokenizer", "cl100k"]) == 2


def test_cli_storage_flags():
    """--endpoint-url/--profile/--region become shards.storage's options (R2 gets region "auto"
    unless --region says otherwise); Storage.kwargs, what the manifest step hands upload(), carries
    the same three."""
    from pipelines.cli import build_parser
    from pipelines.spec import Storage
    from pipelines.fineweb import CORPUS

    r2 = "https://acct.r2.cloudflarestorage.com"
    parse = build_parser(CORPUS).parse_args

    def storage_options(args):
        return Storage.from_args(args).options()
    assert storage_options(parse(["tokenize"])) == {}
    assert storage_options(parse(["tokenize", "--endpoint-url", r2, "--profile", "p"])) == {
        "client_kwargs": {"endpoint_url": r2, "region_name": "auto"}, "profile": "p"}
    args = parse(["tokenize", "--endpoint-url", "http://127.0.0.1:9", "--region", "eu-west-1"])
    assert storage_options(args) == {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9", "region_name": "eu-west-1"}}
    assert Storage.from_args(args).kwargs() == {"endpoint_url": "http://127.0.0.1:9", "profile": None, "region": "eu-west-1"}
