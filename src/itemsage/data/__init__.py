"""The data stage: a catalog and engagement logs checked, normalised and time-split into a dataset
directory (ingest.py and its parts), and the seeded demo shop (demo_shop/). `itemsage demo-data`,
`itemsage ingest`."""
