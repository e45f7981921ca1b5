"""Embedding the catalog with a trained model: resumable, incremental shards (shards.py), a catalog
without logs (catalog.py), Ray Data (ray_engine.py). `itemsage embed`."""
