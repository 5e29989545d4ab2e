"""Molmo runtime: config, tokenizer, preprocessing, bundles, backends and the CLI. Never imports torch."""
