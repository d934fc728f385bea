"""Everything that knows about ECG files on disk and nothing about models."""
