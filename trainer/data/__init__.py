"""What a run trains on. ``prepare`` turns text, JSONL and Parquet files (``sources``) into a token
dataset with a ``tokenizer``; ``dataset`` opens that dataset and orders its windows per epoch by a
seeded bijection; ``loader`` serves samples by global index (synthetic, or from the dataset) and
fetches the next batch ahead. A sample is a pure function of ``(seed, index)``, so any world size
draws the same ones and there is no loader state to checkpoint."""
