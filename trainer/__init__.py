"""A compact DDP trainer that consumes token shards."""
