"""Event handlers for engine_kit trainers; each usable alone."""

__all__: list[str] = []
