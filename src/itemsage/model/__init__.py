"""The model: the product tower (tower.py) over hashed text bags and image vectors (batch.py,
hash_embedding.py), the query adapters, and the model object with its artifact (model.py;
`itemsage.load`). Configurations and presets in config.py."""
