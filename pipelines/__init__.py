"""Datatrove pipelines that turn raw corpora into token shards."""
