"""The table of supported architectures, for `info --architectures` and the README."""

from __future__ import annotations


def architecture_table() -> list[dict]:
    """One row per supported `architectures[0]` string, sorted: {"architecture", "family", "notes"}, where notes
    say what the family adds over Llama and its limits (e.g. parts that are not loaded)."""
    from ..architecture import supported_architectures
    return [{"architecture": name, "family": entry.params.family or "llama", "notes": entry.notes}
            for name, entry in supported_architectures().items()]
