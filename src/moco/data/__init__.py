"""Images in: data sets decoded into memory, WebDataset shards streamed, and batched augmentation."""
