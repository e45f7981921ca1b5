"""The index: faiss (faiss_index.py) or Milvus (milvus.py) over the embeddings, versioned with a
CURRENT pointer (versions.py, build.py), live updates (live.py, live_log.py), and retrieval with
products as queries (by_product.py, home.py), which serve and evaluate share. `itemsage index`."""
