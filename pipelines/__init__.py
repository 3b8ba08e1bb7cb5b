"""Datatrove pipelines that turn raw corpora into token shards.

Reusable steps (any datatrove pipeline):
  pipelines.steps     HashSplit (train/val by blake2b of the normalised text + seed), TokenizeShards
                      (OUTPUT/<split>/<rank>.ds via shards.format.ShardWriter), WriteManifest
  pipelines.readers   CountingJsonlReader / CountingParquetReader (bad rows counted and named),
                      make_reader / resolve_input (input checks, InputError -> exit 2)
  pipelines.filters   FineWeb's chain offline (local fastText LID, URL, Gopher, C4, FineWeb quality),
                      MinHash dedup stages
  pipelines.decont    Decontaminate (--decontaminate: lm-eval task n-grams, shards.evalsets/ngrams)
Command line (shared by every corpus): pipelines.cli.main(Corpus(...)); corpora: pipelines.fineweb,
pipelines.fineweb_edu, pipelines.ultra_fineweb, pipelines.finemath, pipelines.cosmopedia,
pipelines.ultradata_math, pipelines.smoltalk (docs/data.md). Across corpora: python -m pipelines.cross_dedup.
Tokenizer: python -m pipelines.train_tokenizer.
Embedded demo: python -m pipelines.demo --output out/demo.
"""
