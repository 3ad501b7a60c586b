"""Reproducible studies behind the `dvemb` subcommands."""
