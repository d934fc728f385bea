"""TFDS builder package (tfds wants `<name>/<name>_dataset_builder.py`)."""
