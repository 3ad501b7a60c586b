"""Computing data value embeddings from a store."""
